"""Does masked-gene pretraining help when labels are scarce?

Protocol (fixed seeds throughout):

* Pretraining data: pbmc3k, all 2,700 cells (labels unused), restricted to the 765 genes of the
  embedded PBMC counts (``sclatent.datasets.pbmc68k_counts()``), in that order.
  ``MaskedGeneModel`` with the MLP encoder (defaults: 15 % of genes hidden, NB, 32-d, early
  stopping on held-out masked NLL) and with the transformer encoder (64 top genes, d 64, 2 layers,
  4 heads; at most ``--transformer-epochs`` epochs: it costs ~10x the MLP per epoch on CPU).
* Labelled data: the embedded PBMC counts (700 cells, 10 ``bulk_labels``), split once,
  stratified 70/30 (seed 0): 490 training cells, 210 held-out cells, the same for every method.
  From the training part, 1 %, 10 % and 100 % of the cells are labelled
  (:func:`sclatent.model.masked.labelled_subset`: 5, 49 and 490 cells; 10 % and 100 % stratified,
  1 % uniformly at random since 5 cells cannot cover 10 classes), for seeds 0-4; every method
  gets the same labelled cells.
* Methods: logistic regression (sklearn, C=1, features standardised on all 700 cells) on scanpy
  PCA (50 PCs of all 700 cells) and on the latent of sclatent's VAE (10-d, ZINB, trained
  unsupervised on the 700 pbmc68k cells); the masked MLP model pretrained on pbmc3k and
  fine-tuned end-to-end (classifier head + encoder, default ``fine_tune``), the same model with a
  random initialisation (no pretraining: isolates the effect of pretraining), and logistic
  regression on the frozen pretrained embeddings (MLP and transformer: linear probes).
* Scores: accuracy and macro-F1 on the 210 held-out cells (macro over the classes present there),
  mean +- sd over the 5 seeds.

Run from the repository root (one thread; timings are inflated when the machine is shared)::

    OMP_NUM_THREADS=1 PYTHONPATH=. SCLATENT_DATA_DIR=../shared/data python benchmarks/bench_masked.py
    ... python benchmarks/bench_masked.py --quick      # few epochs and one seed: a smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from _schedule import matched_schedule

HERE = Path(__file__).resolve().parent
FRACTIONS = (0.01, 0.1, 1.0)


def logistic_scores(features, labels, labelled, test) -> tuple[np.ndarray, dict]:
    """Predictions on ``test`` of a logistic regression fit on ``labelled`` (one class: a constant)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x = StandardScaler().fit_transform(features)
    classes = np.unique(labels[labelled])
    if len(classes) == 1:
        return np.full(len(test), classes[0], dtype=object)
    classifier = LogisticRegression(max_iter=5000, C=1.0)
    classifier.fit(x[labelled], labels[labelled])
    return classifier.predict(x[test])


def score(predicted, truth) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    predicted, truth = np.asarray(predicted).astype(str), np.asarray(truth).astype(str)
    return {
        "accuracy": float(accuracy_score(truth, predicted)),
        "macro_f1": float(f1_score(truth, predicted, labels=np.unique(truth), average="macro", zero_division=0)),
    }


def masked_baseline_nll(counts, train_cells, test_cells, mask_rate, seed=0, batch_size=1024) -> float:
    """Model-free reference for the masked NLL: NB(l_vis * p_g / sum_visible p, theta_g) with gene
    frequencies and method-of-moments theta from ``train_cells`` (as
    ``sclatent.metrics.baselines.nb_baseline_log_likelihood``), on the same hidden genes as
    ``MaskedGeneModel.get_masked_nll(indices=test_cells, seed=seed)``."""
    from sclatent.metrics.baselines import fit_nb_gene_model, nb_log_pmf
    from sclatent.modules.masked import draw_gene_mask

    csr, _, frequency, theta = fit_nb_gene_model(counts, train_cells)
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    for start in range(0, len(test_cells), batch_size):
        cells = test_cells[start : start + batch_size]
        hidden = draw_gene_mask(len(cells), csr.shape[1], mask_rate, generator).numpy()
        x = csr[cells].toarray()
        visible_library = np.maximum((x * ~hidden).sum(1), 1.0)
        visible_share = (frequency[None, :] * ~hidden).sum(1)
        mu = (visible_library / visible_share)[:, None] * frequency[None, :]
        total += float((nb_log_pmf(x, mu, theta) * hidden).sum())
    return -total / max(1, len(test_cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--transformer-epochs", type=int, default=40)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(HERE / "results_masked.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    import sclatent
    from sclatent.metrics import pca_embedding
    from sclatent.model import VAE, MaskedGeneModel
    from sclatent.model.masked import labelled_subset

    seeds = list(range(1 if args.quick else args.seeds))
    epochs = dict(mlp=3 if args.quick else 200, transformer=2 if args.quick else args.transformer_epochs)
    pbmc = sclatent.datasets.pbmc68k_counts()
    labels = pbmc.obs["bulk_labels"].astype(str).to_numpy()
    reference = sclatent.datasets.pbmc3k()[:, pbmc.var_names].copy()
    from sklearn.model_selection import train_test_split

    train_cells, test_cells = train_test_split(np.arange(pbmc.n_obs), test_size=0.3, stratify=labels, random_state=0)
    train_cells, test_cells = np.sort(train_cells), np.sort(test_cells)
    results: dict = {"n_train": len(train_cells), "n_test": len(test_cells), "pretraining": {}, "runs": []}

    # ------------------------------------------------------------------ pretraining on pbmc3k
    MaskedGeneModel.setup_anndata(reference)
    pretrained_dirs = {}
    embeddings = {}
    for encoder in ("mlp", "transformer"):
        start = time.perf_counter()
        model = MaskedGeneModel(reference, encoder=encoder, seed=0)
        model.train(max_epochs=epochs[encoder], accelerator="cpu", progress_bar=False)
        seconds = time.perf_counter() - start
        held_out = model.validation_indices
        info = {
            "epochs": len(model.history["epoch"]),
            "seconds": seconds,
            "seconds_per_epoch": float(np.median(model.history["seconds"])),
            "heldout_masked_nll": model.get_masked_nll(indices=held_out),
            "baseline_masked_nll": masked_baseline_nll(
                reference.X, model.train_indices, held_out, model.module.mask_rate
            ),
            "n_masked": model.n_masked,
        }
        results["pretraining"][encoder] = info
        print(
            f"pretrained {encoder}: {info['epochs']} epochs, {seconds:.0f} s "
            f"({info['seconds_per_epoch']:.2f} s/epoch), held-out masked NLL {info['heldout_masked_nll']:.2f} "
            f"nats/cell (gene-frequency NB baseline {info['baseline_masked_nll']:.2f}), "
            f"{info['n_masked']} genes hidden",
            flush=True,
        )
        directory = Path(f"/tmp/bench_masked_{encoder}")
        model.save(directory, overwrite=True)
        pretrained_dirs[encoder] = directory
        embeddings[f"probe_{encoder}"] = model.get_latent_representation(pbmc)

    # ------------------------------------------------------------------ unsupervised baselines on pbmc68k
    embeddings["pca"] = pca_embedding(pbmc, None)
    vae_data = pbmc.copy()
    VAE.setup_anndata(vae_data)
    vae = VAE(vae_data, n_latent=10, seed=0)
    vae_epochs = 5 if args.quick else 400
    vae.train(max_epochs=vae_epochs, accelerator="cpu", progress_bar=False, **matched_schedule(vae_epochs))
    embeddings["vae"] = vae.get_latent_representation()

    # ------------------------------------------------------------------ labelled runs
    for fraction in FRACTIONS:
        for seed in seeds:
            labelled = labelled_subset(labels, fraction, seed, train_cells)
            row = {"fraction": fraction, "seed": seed, "n_labelled": len(labelled)}
            for name in ("pca", "vae", "probe_mlp", "probe_transformer"):
                row[name] = score(logistic_scores(embeddings[name], labels, labelled, test_cells), labels[test_cells])
            for name, pretrained in (("masked_pretrained", True), ("masked_random_init", False)):
                data = pbmc.copy()
                if pretrained:
                    model = MaskedGeneModel.load(pretrained_dirs["mlp"], adata=None)
                else:
                    model = MaskedGeneModel(reference, encoder="mlp", seed=seed)
                start = time.perf_counter()
                model.fine_tune(
                    data, labels_key="bulk_labels", indices=labelled, seed=seed, accelerator="cpu", progress_bar=False
                )
                row[name] = score(model.predict(data, indices=test_cells), labels[test_cells])
                row[name]["seconds"] = time.perf_counter() - start
            results["runs"].append(row)
            print(
                f"fraction {fraction:.2f} seed {seed} ({len(labelled)} labelled): "
                + ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in row.items() if isinstance(v, dict)),
                flush=True,
            )

    methods = ["pca", "vae", "masked_random_init", "masked_pretrained", "probe_mlp", "probe_transformer"]
    summary = {}
    for fraction in FRACTIONS:
        rows = [r for r in results["runs"] if r["fraction"] == fraction]
        summary[str(fraction)] = {
            m: {
                f"{metric}_{stat}": float(getattr(np, stat)([r[m][metric] for r in rows]))
                for metric in ("accuracy", "macro_f1")
                for stat in ("mean", "std")
            }
            for m in methods
        }
        summary[str(fraction)]["n_labelled"] = rows[0]["n_labelled"]
    results["summary"] = summary
    Path(args.out).write_text(json.dumps(results, indent=1))

    print(f"\nHeld-out accuracy / macro-F1 on {len(test_cells)} cells, mean +- sd over {len(seeds)} seeds")
    columns = [f"{int(f * 100)} % ({summary[str(f)]['n_labelled']} cells)" for f in FRACTIONS]
    header = f"{'method':<22}" + "".join(f"{c:>34}" for c in columns)
    print(header)
    for m in methods:
        line = f"{m:<22}"
        for f in FRACTIONS:
            s = summary[str(f)][m]
            accuracy = f"{s['accuracy_mean']:.3f} +- {s['accuracy_std']:.3f}"
            line += f"{accuracy:>19} / {s['macro_f1_mean']:.3f} +- {s['macro_f1_std']:.3f}"
        print(line)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
