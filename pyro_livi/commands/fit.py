"""``pyro-livi fit``: fit a model and write RUN_DIR."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("fit", help="fit a model to an .h5ad/.h5mu file and write RUN_DIR",
                              description="Fit a model; RUN_DIR receives model.pt, D.tsv, V.tsv, A.tsv, "
                              "cell_state.tsv, loadings, dispersions, history.tsv and loss_curve.png.")
    p.add_argument("--data", required=True, help=".h5ad or .h5mu file with raw counts")
    p.add_argument("--model", default="livi",
                   help="model name: livi (default), multislivi or dmlivi (RNA + protein MuData)")
    p.add_argument("--donor-key", required=True, help=".obs column with donor ids")
    p.add_argument("--layer", default=None, help="layer with raw counts (default: .X)")
    p.add_argument("--covariate-keys", nargs="*", default=[], help="categorical .obs covariates")
    p.add_argument("--likelihood", default="nb", help="RNA likelihood (nb, zinb, poisson, ...)")
    p.add_argument("--modalities", default=None,
                   help="multislivi/dmlivi: comma-separated MuData modalities, RNA first, each "
                   "optionally with its count layer as name:layer (default: rna,prot; --layer "
                   "applies to the first when it has none)")
    p.add_argument("--optional-modalities", default="",
                   help="comma-separated modalities some cells lack (dmlivi), e.g. prot")
    p.add_argument("--protein-weight", type=float, default=1.0,
                   help="multislivi/dmlivi: weight lambda of every modality after the first "
                   "(seed 001 uses 50 to 200; RNA keeps 1)")
    p.add_argument("--protein-likelihood", default="nb",
                   help="multislivi/dmlivi: likelihood of every modality after the first "
                   "(nb, nb_mixture, ...)")
    p.add_argument("--link", choices=["softmax", "identity"], default=None,
                   help="link of the cell-state decoder term (default: the model's own; "
                   "softmax for livi and multislivi, identity for dmlivi)")
    p.add_argument("--epochs-vae", type=int, default=60, help="epochs of the VAE stage")
    p.add_argument("--epochs", type=int, default=200, help="maximum epochs of the donor stage")
    p.add_argument("--warmup-epochs-G", type=int, default=0, help="epochs of V alone before D joins")
    p.add_argument("--persistent-in-vae-stage", action="store_true",
                   help="train V and W_V jointly with the VAE in stage 1, so that the cell state "
                   "does not absorb persistent donor effects (recommended; the paper trains the VAE alone)")
    p.add_argument("--patience", type=int, default=20, help="early-stopping patience (epochs)")
    p.add_argument("--n-cell-state", type=int, default=15, help="K_C (K_shared for dmlivi)")
    p.add_argument("--n-dxc", type=int, default=100, help="K_DxC, number of interaction factors D")
    p.add_argument("--n-persistent", type=int, default=5, help="K_V, number of persistent factors V")
    p.add_argument("--donor-guide", choices=["delta", "normal"], default="delta",
                   help="point estimates (delta) or a Normal posterior for D and V")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=8e-4, help="Adam learning rate of the VAE parts")
    p.add_argument("--donor-lr", type=float, default=1e-2, help="Adam learning rate of the donor parts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoints")
    p.add_argument("--out", required=True, help="RUN_DIR")
    p.set_defaults(func=run)


def _modalities(text: str, layer: str | None) -> dict:
    """"rna,prot" or "rna:counts,prot" -> {"rna": "counts", "prot": None}."""
    out = {}
    for k, item in enumerate(part.strip() for part in text.split(",") if part.strip()):
        name, _, own_layer = item.partition(":")
        out[name] = own_layer or (layer if k == 0 else None)
    return out


def _model_options(args) -> dict:
    """Constructor options of the chosen model from the command line."""
    common = dict(n_dxc=args.n_dxc, n_persistent=args.n_persistent, donor_guide=args.donor_guide)
    if args.link is not None:
        common["link"] = args.link
    if args.model == "livi":
        return dict(likelihood=args.likelihood, n_cell_state=args.n_cell_state, **common)
    first, *rest = _modalities(args.modalities or "rna,prot", args.layer)
    likelihoods = {first: args.likelihood, **{m: args.protein_likelihood for m in rest}}
    weights = {first: 1.0, **{m: args.protein_weight for m in rest}}
    size = {"n_cell_state" if args.model == "multislivi" else "n_shared": args.n_cell_state}
    return dict(likelihoods=likelihoods, modality_weights=weights, **size, **common)


def run(args) -> int:
    from ..run import fit

    multimodal = args.model != "livi"
    result = fit(
        args.data, model=args.model, donor_key=args.donor_key, layer=args.layer,
        modalities=_modalities(args.modalities or "rna,prot", args.layer) if multimodal else None,
        optional_modalities=[m for m in args.optional_modalities.split(",") if m.strip()],
        covariate_keys=args.covariate_keys, epochs_vae=args.epochs_vae, epochs=args.epochs,
        warmup_epochs_G=args.warmup_epochs_G, persistent_in_vae_stage=args.persistent_in_vae_stage,
        patience=args.patience, batch_size=args.batch_size,
        lr=args.lr, donor_lr=args.donor_lr, seed=args.seed, device=args.device, out=args.out,
        resume=args.resume, **_model_options(args),
    )
    last = result.history.iloc[-1]
    print(f"fitted {args.model} on {result.dataset.n_cells} cells, {len(result.dataset.donor_index)} donors; "
          f"{len(result.history)} epochs, final loss {last['loss']:.4f} per cell; outputs in {args.out}")
    return 0
