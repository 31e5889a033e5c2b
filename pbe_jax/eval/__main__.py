"""python -m pbe_jax.eval RESULTS [RESULTS ...] --benchmark BENCH: score edits the way the paper does.

Several results folders (a model and its baselines) print one comparison table, a row per folder, in
Markdown. RESULTS holds RESULTS/<id>.png (what `python sample.py --batch BENCH --out RESULTS` writes); BENCH is a
COCOEE-layout folder (source/, mask/, reference/; masks white = edited) with, optionally, labels.jsonl:
{"id": ..., "box": [x0, y0, x1, y1], "reference": {"shape": i, "colour": i, "pattern": i}} per line.
The generated region of an item is the result cropped to its box (the mask's bounding box without labels).
Every folder and file may be local or in a bucket (gs://...).

  CLIP        cosine similarity of the CLIP tower's pooled embeddings of the generated region and the
              reference (the paper prints it x 100); needs --model
  PSNR, SSIM  the result against the source outside the mask (how well the rest is kept; inf = identical)
  attributes  how often a small classifier, trained on the synthetic world's labels, reads the reference's
              shape, colour and pattern in the generated region (with labels.jsonl); the classifier is
              loaded from --classifier, or trained (about a minute on CPU) and saved there for next time
  FID         with --inception MODULE:FUNCTION, a Python function from a list of uint8 (H, W, 3) images to
              (N, 2048) Inception pool features (none ships with pbe_jax), against --fid-stats (an .npz with
              mu and sigma, see pbe_jax.eval.metrics.save_stats) or else against the benchmark's sources

Missing or unreadable results are counted, listed and skipped. Exit status 1 on bad arguments or inputs.

  --protocol cocoee
              the paper's Table 1 as the original release computes it, on the release's COCOEE layout
              (GT_3500/, Mask_bbox_3500/, Ref_3500/, id_list.npy): CLIP score (region vs reference), FID and
              QS in CLIP ViT-B/32 feature space, and the standard Inception FID, with PSNR/SSIM of the
              unmasked region. --model is a transformers CLIPModel or CLIPVisionModelWithProjection folder
              (openai/clip-vit-base-patch32); --fid-reference DIR the real images (COCO test2017), whose
              statistics are computed once and cached (--fid-stats NPZ names the cache); --gmm NPZ the QS
              mixture; --inception-weights the pytorch-fid weights file (pt_inception-2015-12-05-*.pth or a
              safetensors conversion). See pbe_jax/eval/cocoee_protocol.py.

  python -m pbe_jax.eval gmm-to-npz FILE OUT
              converts a pickled scikit-learn GaussianMixture (GMM-GIQA's released model, for the QS
              score) into plain arrays, once; needs scikit-learn, and unpickling runs code from FILE
"""
import argparse
import importlib
import json
import sys

CLASSIFIER_DIR = "attribute_classifier"  # under the benchmark folder, where a trained classifier is cached


def parse_args(argv=None):
    from pbe_jax import compile_cache

    p = argparse.ArgumentParser(prog="python -m pbe_jax.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="folder(s) of edited images, <id>.png")
    p.add_argument("--benchmark", required=True, help="COCOEE-layout benchmark folder (source/, mask/, reference/)")
    p.add_argument("--model", help="folder with the CLIP tower for the CLIP score: a Paint-by-Example folder or "
                                   "checkpoint, its image_encoder/, or a transformers CLIP(Vision)Model folder; with "
                                   "--protocol cocoee a CLIPModel or CLIPVisionModelWithProjection folder (ViT-B/32)")
    p.add_argument("--classifier", help=f"attribute classifier folder (default BENCH/{CLASSIFIER_DIR}); "
                                        "trained and saved there when it does not exist yet")
    p.add_argument("--no-attributes", action="store_true", help="skip the attribute score")
    p.add_argument("--train-steps", type=int, default=None, help="steps when the classifier has to be trained "
                                                                 "(default: train_classifier's)")
    p.add_argument("--seed", type=int, default=0, help="seed for training the classifier")
    p.add_argument("--protocol", choices=("synthetic", "cocoee"), default="synthetic",
                   help="synthetic: this project's benchmark (default); cocoee: the paper's Table 1 (see above)")
    p.add_argument("--inception", metavar="MODULE:FUNCTION", help="Inception feature function, for FID")
    p.add_argument("--fid-stats", metavar="NPZ", help="real-image feature statistics for FID (synthetic: an .npz "
                                                      "with mu and sigma; cocoee: the cache --fid-reference writes)")
    cocoee = p.add_argument_group("--protocol cocoee")
    cocoee.add_argument("--fid-reference", metavar="DIR", help="real images (COCO test2017) for the FIDs; their "
                                                               "statistics are cached in --fid-stats")
    cocoee.add_argument("--gmm", metavar="NPZ", help="the QS mixture, converted with gmm-to-npz")
    cocoee.add_argument("--inception-weights", metavar="FILE", help="pytorch-fid's InceptionV3 weights (.pth or "
                                                                    ".safetensors) for the standard FID")
    cocoee.add_argument("--clip-dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                        help="CLIP's compute and weight dtype (the original ran it in float16 on a GPU)")
    cocoee.add_argument("--progress", action="store_true", help="progress bars on stderr even when it is not a "
                                                                "terminal (default: only on a terminal)")
    p.add_argument("--batch-size", type=int, default=32, help="items read and embedded at a time")
    p.add_argument("--per-item", action="store_true", help="also print one row per item")
    p.add_argument("--json", action="store_true", help="print the whole report as JSON (PSNR inf as Infinity)")
    p.add_argument("--report", metavar="FILE", help="also write the whole report as JSON to FILE (local or gs://)")
    compile_cache.add_argument(p)
    args = p.parse_args(argv)
    given = lambda names: [f"--{n.replace('_', '-')}" for n in names if getattr(args, n)]  # noqa: E731
    if args.protocol == "cocoee":
        if not args.model:
            p.error("--protocol cocoee needs --model, a CLIP ViT-B/32 folder (CLIPModel or "
                    "CLIPVisionModelWithProjection)")
        if wrong := given(["inception", "classifier", "no_attributes", "train_steps"]):
            p.error(f"{', '.join(wrong)}: not used by --protocol cocoee")
    else:
        if wrong := given(["fid_reference", "gmm", "inception_weights"]):
            p.error(f"{', '.join(wrong)}: only with --protocol cocoee")
        if args.fid_stats and not args.inception:
            p.error("--fid-stats needs --inception: the results' features have to be computed too")
    return args


def import_function(spec: str):
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"--inception {spec!r}: expected MODULE:FUNCTION, e.g. mypackage.inception:features")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--inception {spec!r}: {type(e).__name__}: {e}") from e
    if not callable(fn):
        raise ValueError(f"--inception {spec!r} is a {type(fn).__name__}, not a function")
    return fn


def get_classifier(args):
    """Load the classifier, or train it and save it for the next run (a read-only benchmark only warns)."""
    from pbe_jax import storage
    from pbe_jax.eval import attributes, world

    extra_colours, _ = world(args.benchmark)  # the classifier reads the benchmark's world
    folder = storage.path(args.classifier) if args.classifier else storage.path(args.benchmark) / CLASSIFIER_DIR
    if (folder / attributes.CONFIG_FILE).is_file():
        return attributes.load(folder, extra_colours)
    print(f"training the attribute classifier (saved to {folder})", file=sys.stderr)
    steps = {} if args.train_steps is None else {"steps": args.train_steps}
    classifier, score = attributes.train_classifier(seed=args.seed, log_every=500, extra_colours=extra_colours,
                                                    **steps)
    print(f"attribute classifier: held-out accuracy {json.dumps(score)}", file=sys.stderr)
    try:
        attributes.save(classifier, folder, {"held_out": score, "seed": args.seed, **steps})
    except OSError as e:
        print(f"warning: could not save the classifier to {folder} ({e}); it is used for this run only",
              file=sys.stderr)
    return classifier


def table(report: dict) -> str:
    m, skipped = report["metrics"], report["skipped"]
    lines = [f"{'metric':<28}{'value':>10}{'n':>7}"]

    def row(name, value, n, fmt):
        lines.append(f"{name:<28}{format(value, fmt):>10}{n:>7}")

    for key, name, fmt in (("clip", "CLIP score (cosine)", ".4f"), ("psnr", "PSNR unmasked (dB)", ".2f"),
                           ("ssim", "SSIM unmasked", ".4f")):
        if m[key] is not None:
            row(name, m[key]["mean"], m[key]["n"], fmt)
    if m["attributes"] is not None:
        for key in ("shape", "colour", "pattern", "all"):
            row(f"attributes: {key}", m["attributes"][key], m["attributes"]["n"], ".3f")
    if m["fid"] is not None:
        row("FID", m["fid"]["value"], m["fid"]["n"], ".2f")
    lines += [f"{name}: skipped, {why}" for name, why in skipped.items()]
    lines.append(f"{report['evaluated']} of {report['items']} items evaluated; {len(report['missing'])} results "
                 f"missing" + (f" (e.g. {', '.join(report['missing'][:5])})" if report["missing"] else "") +
                 f"; {len(report['failed'])} unreadable; {report['resized']} resized to the source's size")
    lines += [f"  failed {f['id']}: {f['error']}" for f in report["failed"][:10]]
    return "\n".join(lines)


def comparison_table(reports: dict[str, dict]) -> str:
    """One Markdown row per results folder: the headline metrics side by side."""
    columns = [("CLIP score", lambda m: m["clip"] and m["clip"]["mean"] * 100, ".2f"),
               ("PSNR unmasked (dB)", lambda m: m["psnr"] and m["psnr"]["mean"], ".2f"),
               ("SSIM unmasked", lambda m: m["ssim"] and m["ssim"]["mean"], ".4f")]
    columns += [(f"attr. {k}", lambda m, k=k: m["attributes"] and m["attributes"][k], ".3f")
                for k in ("shape", "colour", "pattern", "all")]
    columns.append(("FID", lambda m: m["fid"] and m["fid"]["value"], ".2f"))
    used = [c for c in columns if any(c[1](r["metrics"]) is not None for r in reports.values())]
    lines = ["| results | n | " + " | ".join(c[0] for c in used) + " |", "|---" * (len(used) + 2) + "|"]
    for name, r in reports.items():
        cells = ["-" if (v := get(r["metrics"])) is None else format(v, fmt) for _, get, fmt in used]
        lines.append(f"| {name} | {r['evaluated']} | " + " | ".join(cells) + " |")
    notes = [f"{name}: {len(r['missing'])} missing, {len(r['failed'])} unreadable" for name, r in reports.items()
             if r["missing"] or r["failed"]]
    return "\n".join(lines + notes)


def per_item_table(report: dict, clip: tuple[str, str] = ("clip", ".4f")) -> str:
    """One line per item: its CLIP score (`clip`: the row key and its format), PSNR, SSIM, and the attribute
    classifier's reading where there is one."""
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    lines = [f"{'id':<20}{'clip':>8}{'psnr':>8}{'ssim':>8}  predicted / label"]
    for r in report["per_item"]:
        attrs = "" if r.get("predicted") is None else f"  {r['predicted']} / {r['label']}"
        lines.append(f"{r['id']:<20}{fmt(r[clip[0]], clip[1]):>8}{fmt(r['psnr'], '.2f'):>8}"
                     f"{fmt(r['ssim'], '.4f'):>8}{attrs}")
    return "\n".join(lines)


def by_name(reports: dict[str, dict]) -> dict[str, dict]:
    """The reports keyed by their folders' own names where those tell them apart, else by the paths given."""
    from pbe_jax import storage

    names = [storage.path(f).name for f in reports]
    return dict(zip(names if len(set(names)) == len(names) else reports, reports.values()))


def gmm_to_npz_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m pbe_jax.eval gmm-to-npz",
                                description="Convert a pickled scikit-learn GaussianMixture (GMM-GIQA's model) into "
                                            "an .npz of plain arrays. Unpickling runs code: convert files you trust.")
    p.add_argument("file", help="the pickle (local or gs://)")
    p.add_argument("out", help="the .npz to write (local or gs://)")
    args = p.parse_args(argv)
    from pbe_jax.eval import gmm

    try:
        mixture = gmm.gmm_to_npz(args.file, args.out)
    except (OSError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    k, d = mixture.means.shape
    print(f"wrote {args.out}: {k} components, {d} dimensions, {mixture.covariance_type} covariances")
    return 0


def emit_json(args, reports: dict) -> bool:
    """Write the report to --report, print it with --json; True when printed (nothing else to print)."""
    from pbe_jax import storage

    text = json.dumps(reports if len(reports) > 1 else reports[args.results[0]], indent=2)
    if args.report:
        storage.write_text(args.report, text + "\n")
    if args.json:
        print(text)
    return args.json


def cocoee_stats(args, clip, clip_size, inception) -> dict | None:
    """The real set's statistics (--fid-stats, --fid-reference): see cocoee_protocol.cached_reference_stats."""
    from pbe_jax.eval import cocoee_protocol as protocol

    if not args.fid_reference and not args.fid_stats:
        return None
    path = args.fid_stats or protocol.default_stats_path(args.fid_reference, args.model, args.clip_dtype)
    extractors = {"clip": (lambda x: clip(protocol.clip_input(clip_size)(x)),
                           {"model": str(args.model), "dtype": args.clip_dtype})}
    if inception is not None:
        extractors["inception"] = (lambda x: inception(protocol.unit_range(x)), {"model": str(args.inception_weights)})
    return protocol.cached_reference_stats(path, args.fid_reference, extractors, batch_size=args.batch_size,
                                           progress=args.progress or None)


def cocoee_main(args) -> int:
    """--protocol cocoee: one report per results folder; JSON, or Table 1's Markdown rows."""
    from pbe_jax import storage
    from pbe_jax.eval import cocoee_protocol as protocol
    from pbe_jax.eval import gmm as gmm_lib
    from pbe_jax.eval.clip import load_image_features
    from pbe_jax.eval.features import Extractor

    try:
        for folder in args.results:
            if not storage.path(folder).is_dir():
                raise FileNotFoundError(f"{folder}: no such results folder")
        protocol.read_benchmark(args.benchmark)  # a wrong benchmark fails before the networks load
        tower, _ = load_image_features(args.model, dtype=args.clip_dtype)
        clip = Extractor(tower, batch_size=args.batch_size)
        inception = None
        if args.inception_weights:
            from pbe_jax.convert.inception import load_fid_inception

            inception = Extractor(load_fid_inception(args.inception_weights), batch_size=args.batch_size)
        mixture = gmm_lib.load(args.gmm) if args.gmm else None
        size = tower.config.image_size
        stats = cocoee_stats(args, clip, size, inception)
        reports = {folder: protocol.evaluate(folder, args.benchmark, clip=clip, clip_size=size, inception=inception,
                                             gmm=mixture, fid_stats=stats, batch_size=args.batch_size,
                                             progress=args.progress or None)
                   for folder in args.results}
    except (OSError, ValueError) as e:  # WeightsError, ConfigError and ImageError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 1
    if emit_json(args, reports):
        return 0
    print(protocol.markdown(by_name(reports)))
    for folder, report in reports.items() if args.per_item else ():
        print(f"\n{folder}\n" + per_item_table(report, ("clip_score", ".2f")))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["gmm-to-npz"]:
        return gmm_to_npz_main(argv[1:])
    args = parse_args(argv)
    from pbe_jax import compile_cache, storage
    from pbe_jax.eval import LABELS_FILE, evaluate, metrics

    compile_cache.enable(args.compile_cache)  # before anything compiles
    if args.protocol == "cocoee":
        return cocoee_main(args)

    try:
        for folder, what in [(r, "results") for r in args.results] + [(args.benchmark, "benchmark")]:
            if not storage.path(folder).is_dir():  # before a minute of classifier training, not after
                raise FileNotFoundError(f"{folder}: no such {what} folder")
        embed_fn = metrics.clip_embedder(args.model) if args.model else None
        inception_fn = import_function(args.inception) if args.inception else None
        fid_stats = metrics.load_stats(args.fid_stats) if args.fid_stats else None
        has_labels = (storage.path(args.benchmark) / LABELS_FILE).is_file()
        classifier = get_classifier(args) if has_labels and not args.no_attributes else None
        cache = {}  # the benchmark's reference embeddings and source features, shared by all folders
        reports = {folder: evaluate(folder, args.benchmark, embed_fn=embed_fn, classifier=classifier,
                                    inception_fn=inception_fn, fid_stats=fid_stats, batch_size=args.batch_size,
                                    cache=cache)
                   for folder in args.results}
    except (OSError, ValueError) as e:  # WeightsError, ConfigError and ImageError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 1
    for report in reports.values():
        if args.no_attributes:
            report["skipped"]["attributes"] = "--no-attributes"
    if emit_json(args, reports):
        return 0
    if len(reports) > 1:
        print(comparison_table(by_name(reports)))
    for folder, report in reports.items():
        if len(reports) == 1 or args.per_item:
            print(("" if len(reports) == 1 else f"\n{folder}\n") + table(report))
        if args.per_item:
            print(per_item_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
