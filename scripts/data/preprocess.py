"""Preprocess native neonatal T2w scans into the network's space, and send maps back.

    python -m scripts.data.preprocess run --datalist native.json --template T2w_40wk.nii.gz \\
        [--template-mask mask.nii.gz] --output /data/prep [--method sitk|ants] [--bspline] [--workers 2]
    python -m scripts.data.preprocess to-native --subject-dir /data/prep/sub-X --map sub-X_relevance_a2b1.nii.gz \\
        --output sub-X_relevance_a2b1_native.nii.gz
    python -m scripts.data.preprocess template --ckpt_dir models [--override '{"dataset_dir": "/data/prep"}']

``run``: for every datalist item (``image`` + brain ``mask``, optional drawem9 ``tissue``; named
``<subject>_<session>`` from the datalist, else by the image file name): skull strip by the
mask -> register to the template (``scripts.data.registration``) -> resample at 1 mm onto the template grid cropped
or padded to 128 x 96 x 96 (AP x LR x SI) around the template brain -> NIfTI. Tissue labels and the mask follow
with nearest-neighbour resampling. Per subject ``<output>/<subject>/``: ``<subject>.nii.gz``, ``_mask``,
``_dseg``, the transforms and ``<subject>_preprocess.json`` (written last: a subject with it is finished and is
skipped on a rerun). Subjects run in parallel with a progress bar; a failing subject is logged in
``<output>/preprocess_failures.csv`` and the batch goes on. ``<output>/datalist.json`` keeps the input's splits
and points at the preprocessed files (``native_image`` keeps the original).

``template``: the registration template that ``run inference`` (``preprocess`` auto|on) registers native scans to,
``template_T2w.nii.gz`` + ``template_mask.nii.gz`` in ``--ckpt_dir``, from ``train.json``'s training split through
its deterministic preprocessing -- what training writes beside ``model.pt`` (``QCReferenceWriter``); for weights
trained before the template existed, and how the shipped ``models/`` template is made (it does not depend on the
weights).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from scripts.data.registration import get_backend, write_image
from scripts.runtime.checks import check_image
from scripts.runtime.errors import report_input_errors
from scripts.runtime.outputs import atomic_write_text, remove_stale_temporaries, subject_name, write_csv
from scripts.runtime.progress import progress

__all__ = ["make_reference", "output_name", "preprocess_subject", "run_batch", "to_native"]

logger = logging.getLogger(__name__)
SHAPE_ALS = (128, 96, 96)  # anterior-posterior, left-right, superior-inferior (the configs' ALS order)


def make_reference(template: str, template_mask: str | None, out_dir: Path, shape_als=SHAPE_ALS) -> tuple[Path, Path]:
    """Template (skull-stripped by its mask, or by its non-zero voxels) resampled at 1 mm and cropped/padded to
    ``shape_als`` around the brain's bounding-box centre: the fixed image of every registration."""
    import SimpleITK as sitk  # noqa: PLC0415 (only where a scan is registered)

    if not Path(template).is_file():
        raise FileNotFoundError(f"template {template} not found (e.g. the dHCP 40-week T2w template; see docs)")
    if template_mask and not Path(template_mask).is_file():
        raise FileNotFoundError(f"template mask {template_mask} not found")
    image = sitk.ReadImage(str(template), sitk.sitkFloat32)
    mask = (sitk.ReadImage(str(template_mask)) > 0) if template_mask else (image > 0)
    mask = sitk.Cast(mask, sitk.sitkUInt8)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    # ITK physical axes are L-R, P-A, I-S: each image axis takes the size of its anatomical axis
    size_by_axis = {0: shape_als[1], 1: shape_als[0], 2: shape_als[2]}
    size = [int(size_by_axis[int(np.argmax(np.abs(direction[:, i])))]) for i in range(3)]
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(mask)
    if not stats.GetLabels():
        raise ValueError(f"template mask {template_mask or template} is empty")
    centre = np.array(stats.GetCentroid(1))  # physical point
    spacing = (1.0, 1.0, 1.0)
    origin = centre - direction @ ((np.array(size) - 1) / 2.0 * np.array(spacing))
    reference = sitk.Image(size, sitk.sitkFloat32)
    reference.SetSpacing(spacing)
    reference.SetDirection(image.GetDirection())
    reference.SetOrigin(tuple(float(v) for v in origin))
    stripped = sitk.Mask(image, mask)
    ref_image = sitk.Resample(stripped, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    ref_mask = sitk.Resample(mask, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_image(ref_image, out_dir / "template_grid.nii.gz")
    write_image(ref_mask, out_dir / "template_grid_mask.nii.gz")
    return out_dir / "template_grid.nii.gz", out_dir / "template_grid_mask.nii.gz"


def output_name(item: dict) -> str:
    """``<subject>_<session>`` from the datalist item, else the image file name without extensions."""
    return "_".join(str(item[k]) for k in ("subject", "session") if item.get(k)) or subject_name(item["image"])


def preprocess_subject(item: dict, reference: str, output: str, method: str, options: dict) -> dict:
    """Preprocess one subject; returns its record (also written to ``<subject>_preprocess.json``)."""
    import SimpleITK as sitk  # noqa: PLC0415 (only where a scan is registered)


    subject = output_name(item)
    folder = Path(output) / subject
    record_path = folder / f"{subject}_preprocess.json"
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if all((folder / record[k]).is_file() for k in ("image", "mask")):
            return {**record, "skipped": True}
    if "mask" not in item:
        raise ValueError(f"{item['image']}: no brain mask in the datalist item (key 'mask')")
    for key in ("image", "mask", "tissue"):
        if key in item:
            check_image(item[key], scan=key == "image")
    folder.mkdir(parents=True, exist_ok=True)
    backend = get_backend(method, **options)
    image = sitk.ReadImage(str(item["image"]), sitk.sitkFloat32)
    mask = sitk.Cast(sitk.ReadImage(str(item["mask"])) > 0, sitk.sitkUInt8)
    if mask.GetSize() != image.GetSize():
        raise ValueError(f"{item['mask']}: brain mask grid {mask.GetSize()} differs from the image "
                         f"{item['image']} ({image.GetSize()})")
    mask.CopyInformation(image)
    stripped_path = folder / f"{subject}_native_brain.nii.gz"
    write_image(sitk.Mask(image, mask), stripped_path)
    native_mask = folder / f"{subject}_native_mask.nii.gz"
    write_image(mask, native_mask)
    transforms = backend.register(reference, str(stripped_path), folder, subject)
    record = {"subject": subject, "native_image": str(item["image"]), "native_brain": stripped_path.name,
              "native_mask": native_mask.name, "method": backend.name, "transforms": transforms,
              "image": f"{subject}.nii.gz", "mask": f"{subject}_mask.nii.gz"}
    backend.to_template(str(stripped_path), reference, folder / record["image"], folder, transforms)
    backend.to_template(str(native_mask), reference, folder / record["mask"], folder, transforms, nearest=True)
    if "tissue" in item:
        record["tissue"] = f"{subject}_dseg.nii.gz"
        backend.to_template(str(item["tissue"]), reference, folder / record["tissue"], folder, transforms, nearest=True)
    atomic_write_text(json.dumps(record, indent=2), record_path)  # last: marks the subject finished
    return record


def _job(args):
    item, reference, output, method, options, threads = args
    import SimpleITK as sitk  # noqa: PLC0415 (only where a scan is registered)

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    try:
        return item, preprocess_subject(item, reference, output, method, options), None
    except Exception as err:  # one bad subject must not stop the batch: it is reported
        return item, None, f"{type(err).__name__}: {err}"


def run_batch(datalist: str, template: str, output: str, template_mask: str | None = None, method: str = "sitk",
              options: dict | None = None, workers: int = 1) -> dict:
    """Preprocess every item of ``datalist`` (training and test) and write ``<output>/datalist.json``."""
    path = Path(datalist)
    if not path.is_file():
        raise FileNotFoundError(f"datalist {path} not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"datalist {path} is not valid JSON: {err}") from err
    get_backend(method, **(options or {}))  # bad method / missing antspyx: fail before any work
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    reference, _ = make_reference(template, template_mask, out)
    jobs = []
    for split in ("training", "test"):
        for item in data.get(split, []):
            item = dict(item)
            for key in ("image", "mask", "tissue"):
                if key in item and not Path(item[key]).is_absolute():
                    item[key] = str(path.parent / item[key])
            jobs.append((split, item))
    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    results, failures = {}, []
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(_job, (item, str(reference), str(out), method, options or {}, threads))
                   for _, item in jobs]
        for future in progress(as_completed(futures), len(futures), "preprocess", "subject"):
            item, record, error = future.result()
            if error:
                logger.error("%s failed: %s", item.get("image"), error)
                failures.append({"subject": output_name(item), "image": item["image"], "error": error})
            else:
                results[output_name(item)] = record
    new = {k: v for k, v in data.items() if k not in ("training", "test")}
    for split in ("training", "test"):
        new[split] = []
        for s, item in jobs:
            record = results.get(output_name(item))
            if s != split or record is None:
                continue
            subject = record["subject"]
            entry = {**item, "native_image": item["image"], "image": f"{subject}/{record['image']}",
                     "mask": f"{subject}/{record['mask']}"}
            entry.pop("tissue", None)
            if "tissue" in record:
                entry["tissue"] = f"{subject}/{record['tissue']}"
            new[split].append(entry)
    new["description"] = f"preprocessed by scripts.data.preprocess ({method}) from {path}"
    atomic_write_text(json.dumps(new, indent=2), out / "datalist.json")
    write_csv(failures, out / "preprocess_failures.csv", ["subject", "image", "error"])
    skipped = sum(1 for r in results.values() if r.get("skipped"))
    logger.info("%d subjects preprocessed (%d were already done), %d failed (%s)", len(results), skipped,
                len(failures), out / "preprocess_failures.csv")
    return {"done": len(results), "skipped": skipped, "failed": failures}


def to_native(subject_dir: str, map_path: str, output: str, nearest: bool = False) -> Path:
    """Resample a template-space map (relevance map, network input, labels) onto the subject's native scan."""
    folder = Path(subject_dir)
    records = sorted(folder.glob("*_preprocess.json"))
    if not records:
        raise FileNotFoundError(f"{folder}: no *_preprocess.json (run python -m scripts.data.preprocess run first)")
    if not Path(map_path).is_file():
        raise FileNotFoundError(f"map {map_path} not found")
    record = json.loads(records[0].read_text())
    backend = get_backend(record["method"])
    backend.to_native(str(map_path), str(folder / record["native_mask"]), Path(output), folder,
                      record["transforms"], nearest=nearest)
    return Path(output)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m scripts.data.preprocess`` (every option's help states its default)."""
    ap = argparse.ArgumentParser(prog="python -m scripts.data.preprocess", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="preprocess every subject of a datalist",
                         description="Skull strip, register to the template, resample at 1 mm onto the template "
                                     "grid (128x96x96); resumable: finished subjects are skipped on a rerun.")
    run.add_argument("--datalist", required=True,
                     help="datalist of native scans (items with image, mask, optional tissue), e.g. from "
                          "scripts.data.dhcp_datalist (required)")
    run.add_argument("--template", required=True,
                     help="40-week T2w template (e.g. dHCP atlas / TemplateFlow dhcpVol) (required)")
    run.add_argument("--template-mask", default=None, help="its brain mask (default: the template's non-zero voxels)")
    run.add_argument("--output", required=True,
                     help="folder for the per-subject folders, datalist.json and preprocess_failures.csv (required)")
    run.add_argument("--method", default="sitk", choices=("sitk", "ants"),
                     help="registration: sitk = SimpleITK rigid -> affine, ants = antspyx (pip install antspyx) "
                          "(default: %(default)s)")
    run.add_argument("--bspline", action="store_true",
                     help="sitk: add a B-spline free-form deformation (default: off, affine only)")
    run.add_argument("--transform", default="SyN",
                     help="ants: type_of_transform (default: %(default)s = affine + SyN)")
    run.add_argument("--workers", type=int, default=1,
                     help="subjects preprocessed in parallel processes (default: %(default)s)")
    back = sub.add_parser("to-native", help="send a template-space map onto a subject's native scan",
                          description="Resample a template-space map (relevance map, network input, labels) onto "
                                      "the baby's native scan with the inverse of its registration.")
    back.add_argument("--subject-dir", required=True,
                      help="the subject's folder written by 'run' (<output>/<subject>) (required)")
    back.add_argument("--map", required=True, help="NIfTI on the template grid to send back (required)")
    back.add_argument("--output", required=True, help="NIfTI to write on the native scan's grid (required)")
    back.add_argument("--nearest", action="store_true",
                      help="nearest-neighbour interpolation, for label maps (default: off, linear)")
    tpl = sub.add_parser("template", help="write the registration template of native scans beside the weights",
                         description="The mean training input on the network grid and its brain mask "
                                     "(template_T2w.nii.gz, template_mask.nii.gz), from configs/train.json's "
                                     "training split, as training writes them.")
    tpl.add_argument("--ckpt_dir", required=True, help="folder of model.pt to write the template into (required)")
    tpl.add_argument("--override", default="{}",
                     help="JSON object of configs/train.json overrides, e.g. dataset_dir, fold, spatial_shape "
                          "(default: %(default)s, the synthetic cohort's fold 0)")
    return ap


def write_template(ckpt_dir: str, overrides: dict | None = None) -> list[Path]:
    """``template_T2w.nii.gz`` and ``template_mask.nii.gz`` in ``ckpt_dir`` from train.json's training split
    through ``validate#preprocessing`` (as ``QCReferenceWriter`` at the end of training), in the normalisation the
    QC reference in ``ckpt_dir`` records (train.json's ``normalisation`` without one; an override must match it)."""
    from monai.bundle import ConfigParser  # noqa: PLC0415 (MONAI only for this command)
    from monai.data import Dataset  # noqa: PLC0415

    from scripts.runtime.normalisation import check_recorded  # noqa: PLC0415
    from scripts.runtime.reference import recorded_normalisation, save_template  # noqa: PLC0415

    root = Path(__file__).resolve().parents[2]
    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "train.json"))
    recorded = recorded_normalisation(ckpt_dir)
    parser.update({"bundle_root": str(root), **({"normalisation": recorded} if recorded else {}), **(overrides or {}),
                   "ckpt_dir": str(ckpt_dir), "device": "$torch.device('cpu')"})
    if recorded:
        check_recorded(ckpt_dir, parser.get_parsed_content("normalisation"))
    dataset = Dataset(parser.get_parsed_content("train#data"), parser.get_parsed_content("validate#preprocessing"))
    inputs = [dataset[i]["image"] for i in progress(range(len(dataset)), desc="template inputs", unit="scan")]
    Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
    return save_template(inputs, ckpt_dir, parser.get_parsed_content("normalisation"))


@report_input_errors
def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.command == "to-native":
        print(to_native(args.subject_dir, args.map, args.output, args.nearest))
        return 0
    if args.command == "template":
        try:
            overrides = json.loads(args.override)
        except json.JSONDecodeError as err:
            raise ValueError(f"--override is not a JSON object: {err}") from None
        for path in write_template(args.ckpt_dir, overrides):
            print(path)
        return 0
    options = {"bspline": args.bspline} if args.method == "sitk" else {"type_of_transform": args.transform}
    summary = run_batch(args.datalist, args.template, args.output, args.template_mask, args.method, options,
                        args.workers)
    print(f"{summary['done']} subjects preprocessed ({summary['skipped']} already done), "
          f"{len(summary['failed'])} failed")
    for f in summary["failed"]:
        print(f"  failed {f['subject']}: {f['error']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
