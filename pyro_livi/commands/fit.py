"""``pyro-livi fit``: fit a model and write RUN_DIR."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("fit", help="fit a model to an .h5ad/.h5mu file and write RUN_DIR",
                              description="Fit a model; RUN_DIR receives model.pt, D.tsv, V.tsv, A.tsv, "
                              "cell_state.tsv, loadings, dispersions, history.tsv and loss_curve.png.")
    p.add_argument("--data", required=True, help=".h5ad or .h5mu file with raw counts")
    p.add_argument("--model", default="livi", help="model name (default: livi)")
    p.add_argument("--donor-key", required=True, help=".obs column with donor ids")
    p.add_argument("--layer", default=None, help="layer with raw counts (default: .X)")
    p.add_argument("--covariate-keys", nargs="*", default=[], help="categorical .obs covariates")
    p.add_argument("--likelihood", default="nb", help="RNA likelihood (nb, zinb, poisson, ...)")
    p.add_argument("--epochs-vae", type=int, default=60, help="epochs of the VAE stage")
    p.add_argument("--epochs", type=int, default=200, help="maximum epochs of the donor stage")
    p.add_argument("--warmup-epochs-G", type=int, default=0, help="epochs of V alone before D joins")
    p.add_argument("--patience", type=int, default=20, help="early-stopping patience (epochs)")
    p.add_argument("--n-cell-state", type=int, default=15, help="K_C")
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


def run(args) -> int:
    from ..run import fit

    result = fit(
        args.data, model=args.model, donor_key=args.donor_key, layer=args.layer,
        covariate_keys=args.covariate_keys, epochs_vae=args.epochs_vae, epochs=args.epochs,
        warmup_epochs_G=args.warmup_epochs_G, patience=args.patience, batch_size=args.batch_size,
        lr=args.lr, donor_lr=args.donor_lr, seed=args.seed, device=args.device, out=args.out,
        resume=args.resume, likelihood=args.likelihood, n_cell_state=args.n_cell_state,
        n_dxc=args.n_dxc, n_persistent=args.n_persistent, donor_guide=args.donor_guide,
    )
    last = result.history.iloc[-1]
    print(f"fitted {args.model} on {result.dataset.n_cells} cells, {len(result.dataset.donor_index)} donors; "
          f"{len(result.history)} epochs, final loss {last['loss']:.4f} per cell; outputs in {args.out}")
    return 0
