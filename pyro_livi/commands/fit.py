"""``pyro-livi fit``: fit any registered model and write RUN_DIR.

The generic flags (data, modalities, training) are the same for every model; the chosen
model's own options (:attr:`~pyro_livi.models.ZooModel.options`) become flags of their own,
listed by ``pyro-livi fit --model NAME --help``.
"""

from __future__ import annotations

import argparse


def _requested_model(argv) -> str:
    """The value of ``--model`` on the command line (``livi`` when absent)."""
    argv = list(argv or [])
    for k, arg in enumerate(argv):
        if arg == "--model" and k + 1 < len(argv):
            return argv[k + 1]
        if arg.startswith("--model="):
            return arg.split("=", 1)[1]
    return "livi"


def _add_option(group, name: str, option) -> None:
    """One model option as a flag whose value reaches the model only when given."""
    flags = [f"--{name.replace('_', '-')}", *option.flags]
    text = f"{option.help} (default: {'not set' if option.default is None else option.default})"
    if isinstance(option.default, bool):
        group.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction,
                           default=argparse.SUPPRESS, help=text)
        return
    element = option.type or type(option.default)
    group.add_argument(*flags, dest=name, type=element, nargs=option.nargs, choices=option.choices,
                       default=argparse.SUPPRESS, help=text)


def register(subparsers, argv=None) -> None:
    from ..likelihoods import LIKELIHOODS
    from ..models import MODELS

    from ._help import DefaultsHelpFormatter

    chosen = _requested_model(argv)
    p = subparsers.add_parser(
        "fit", help="fit a model of the zoo to an .h5ad/.h5mu file and write RUN_DIR",
        formatter_class=DefaultsHelpFormatter,
        description="Fit a model (`pyro-livi models` lists them) on its default training schedule. "
        "RUN_DIR receives model.pt, the model's tables (per-cell latent, and for donor models D.tsv, "
        "V.tsv, A.tsv; loadings, dispersions), history.tsv, loss_curve.png and run.json. "
        "`pyro-livi fit --model NAME --help` lists the options of model NAME.")
    p.add_argument("--data", required=True, help=".h5ad or .h5mu file")
    p.add_argument("--model", default="livi", choices=sorted(MODELS), help="model of the zoo")
    p.add_argument("--donor-key", default=None,
                   help=".obs column with donor ids (needed by models with donor factors)")
    p.add_argument("--layer", default=None, help="layer of the first modality to read (default: .X)")
    p.add_argument("--modalities", default=None,
                   help="comma-separated MuData modalities, the first the reference, each optionally "
                   "with its layer as name:layer (default: rna for an .h5ad and for one-modality models; "
                   "for a .h5mu the file's modalities, rna first, as many as the model takes; "
                   "--layer applies to the first when it has none)")
    p.add_argument("--optional-modalities", default="", help="comma-separated modalities some cells lack")
    p.add_argument("--continuous-modalities", default="",
                   help="comma-separated modalities holding continuous values (log-normalised, CLR, "
                   "TF-IDF) instead of raw counts")
    p.add_argument("--covariate-keys", nargs="*", default=[], help="categorical .obs covariates (e.g. batch)")
    p.add_argument("--label-keys", nargs="*", default=[], help=".obs columns kept for evaluation (e.g. cell_type)")
    p.add_argument("--likelihood", default=None, choices=sorted(LIKELIHOODS),
                   help="likelihood of the first modality (default: the model's, nb)")
    p.add_argument("--protein-likelihood", default=None, choices=sorted(LIKELIHOODS),
                   help="likelihood of every modality after the first (default: the model's, nb)")
    p.add_argument("--epochs", type=int, default=200,
                   help="maximum epochs of the model's last stage (the donor stage of the LIVI family); >= 1")
    p.add_argument("--patience", type=int, default=20,
                   help="early stopping after this many stalled epochs, >= 1 (0: no early stopping)")
    p.add_argument("--train-size", type=float, default=None,
                   help="fraction of cells trained on (seeded split); the rest are validation cells whose "
                   "loss is recorded and watched by early stopping (default: the model's, 0.9; 1.0 for "
                   "livi, multislivi, dmlivi)")
    p.add_argument("--batch-size", type=int, default=1024, help="cells per minibatch")
    p.add_argument("--backed", action="store_true",
                   help="leave the counts on disk (anndata backed mode, .h5ad with CSR counts): memory stays "
                   "flat in the number of cells; minibatches are read in contiguous chunks (--chunk-size)")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="cells per contiguous chunk of the training shuffle: chunks are shuffled, then the "
                   "cells within buffers of --buffer-batches minibatches (default: 128 with --backed, 1 = a "
                   "permutation of the cells in memory)")
    p.add_argument("--buffer-batches", type=int, default=None,
                   help="minibatches' worth of cells shuffled together; needs --chunk-size > 1 (or --backed) (default: 32)")
    p.add_argument("--lr", type=float, default=8e-4, help="Adam learning rate, > 0")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, minibatches and sampling, 0 .. 2**32 - 1")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to train: cpu, or cuda (an NVIDIA GPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice, one per core); 1 is often as fast for "
                   "small models and never slower on a busy machine; with --nproc, the processes share them")
    p.add_argument("--nproc", type=int, default=1,
                   help="train data-parallel in this many local processes (torch.distributed: gloo on cpu, "
                   "nccl on cuda, one GPU each): each minibatch of --batch-size cells is split among them and "
                   "their gradients averaged. Under torchrun leave it at 1: the launched processes train together")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in RUN_DIR from its checkpoint (RUN_DIR/checkpoints); the "
                   "settings must be those of that run")
    p.add_argument("--overwrite", action="store_true",
                   help="RUN_DIR holds another run: remove that run's outputs (model.pt, its tables, "
                   "history.tsv, loss_curve.png, run.json, checkpoints/; never other files) and start "
                   "again. Without --resume or --overwrite, a RUN_DIR holding a run is refused")
    p.add_argument("--out", required=True, help="RUN_DIR")
    if chosen in MODELS:
        cls = MODELS[chosen]
        group = p.add_argument_group(f"options of model {chosen}", cls.summary)
        for name, option in cls.options.items():
            _add_option(group, name, option)
    p.set_defaults(func=run, model_options=tuple(MODELS[chosen].options) if chosen in MODELS else ())


def _refuse_repeats(names: list[str], flag: str) -> None:
    """InputError naming ``flag`` when a name is given twice."""
    repeated = sorted({m for m in names if names.count(m) > 1})
    if repeated:
        from ..errors import InputError

        raise InputError("<arguments>", flag, f"modality(ies) {repeated} given more than once",
                         f"name each modality once, e.g. {flag} {','.join(dict.fromkeys(names))}")


def _modalities(text: str, layer: str | None) -> dict:
    """"rna,prot" or "rna:counts,prot" -> {"rna": "counts", "prot": None}; an InputError naming
    ``--modalities`` when a modality is given twice."""
    out = {}
    items = [part.strip() for part in text.split(",") if part.strip()]
    _refuse_repeats([item.partition(":")[0] for item in items], "--modalities")
    for k, item in enumerate(items):
        name, _, own_layer = item.partition(":")
        out[name] = own_layer or (layer if k == 0 else None)
    return out


def default_modalities(data: str, needs) -> str:
    """``--modalities`` when not given: ``rna`` for an ``.h5ad`` (one modality) and for models of
    one modality; for a ``.h5mu`` and a model of several, the file's modalities (``rna`` first when
    it has one, then the others in the file's order, as many as the model takes)."""
    high = needs.modalities[1]
    if high == 1 or not str(data).endswith(".h5mu"):
        return "rna"
    try:
        import h5py

        with h5py.File(data, "r") as f:
            mods = f["mod"] if "mod" in f else {}
            order = [str(m) for m in getattr(mods, "attrs", {}).get("mod-order", [])]
            names = [m for m in order if m in mods] + [m for m in mods if m not in order]
    except OSError:
        return "rna"  # an unreadable file is reported by the reader, naming the file
    names = sorted(names, key=lambda m: m != "rna")
    return ",".join(names[:high]) if names else "rna"


def _names(text: str, flag: str) -> list[str]:
    """"a,b" -> ["a", "b"]; an InputError naming ``flag`` when a name is given twice."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    _refuse_repeats(names, flag)
    return names


def run(args) -> int:
    import torch

    from ..errors import InputError
    from ..models import MODELS
    from ..run import fit

    if args.threads is not None:
        if args.threads < 1:
            raise InputError("<arguments>", "--threads", f"must be >= 1, got {args.threads}",
                             "give a number of threads, e.g. --threads 1")
        torch.set_num_threads(args.threads)
    if args.nproc < 1:
        raise InputError("<arguments>", "--nproc", f"must be >= 1, got {args.nproc}",
                         "give a number of processes, e.g. --nproc 2")
    cls = MODELS[args.model]
    chosen = args.modalities or default_modalities(args.data, cls.data_needs)
    if args.modalities is None and "," in chosen:
        print(f"modalities: {chosen} (the file's; --modalities chooses others)")
    modalities = _modalities(chosen, args.layer)
    first, *rest = modalities
    likelihoods = {}
    if args.likelihood:
        likelihoods[first] = args.likelihood
    if args.protein_likelihood:
        if not rest:
            raise InputError("<arguments>", "--protein-likelihood", f"applies to the modalities after the first, "
                             f"but this run reads one: {first}",
                             "use --likelihood for the first modality, or name more with --modalities")
        likelihoods.update({m: args.protein_likelihood for m in rest})
    options = {k: getattr(args, k) for k in args.model_options if hasattr(args, k)}
    if likelihoods:
        options["likelihoods"] = likelihoods
    result = fit(
        args.data, model=args.model, donor_key=args.donor_key, modalities=modalities,
        optional_modalities=_names(args.optional_modalities, "--optional-modalities"),
        continuous_modalities=_names(args.continuous_modalities, "--continuous-modalities"),
        covariate_keys=args.covariate_keys, label_keys=args.label_keys, epochs=args.epochs,
        patience=args.patience or None, train_size=args.train_size, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        device=args.device, out=args.out, resume=args.resume, overwrite=args.overwrite, nproc=args.nproc,
        backed=args.backed, chunk_size=args.chunk_size, buffer_batches=args.buffer_batches,
        **options,
    )
    from ..infer.distributed import is_main_process, shutdown

    main = is_main_process()
    shutdown()  # under torchrun: the process group fit() opened
    if not main:
        return 0
    last = result.history.iloc[-1]
    donors = result.dataset.donor_index
    n_cells, n_held = result.dataset.n_cells, len(result.validation)
    cells = (f"{n_cells} cells" if not n_held else
             f"{n_cells - n_held} cells ({n_held} of the {n_cells} held out for validation)")
    print(f"fitted {args.model} on {cells}"
          f"{'' if donors is None else f', {len(donors)} donors'}; {len(result.history)} epochs, "
          f"final loss {last['loss']:.4f} per cell; outputs in {args.out}")
    return 0
