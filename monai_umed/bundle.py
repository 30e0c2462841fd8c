# Copyright (c) monai-umed contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.

"""Components of the ``umed_protect`` MONAI bundle (``bundles/umed_protect``).

The bundle's configs compose these functions with the package's protectors and MONAI transforms, so that

.. code-block:: bash

    python -m monai.bundle run protect --config_file bundles/umed_protect/configs/protect.json
    python -m monai.bundle run restore --config_file bundles/umed_protect/configs/restore.json \\
        --dataset_dir OUT --output_dir RESTORED
    python -m monai.bundle run evaluate --config_file bundles/umed_protect/configs/evaluate.json \\
        --dataset_dir OUT --clean_dir DATA

work from any working directory with nothing but the installed package: with no ``--dataset_dir`` the protect
workflow writes the embedded synthetic dataset (:func:`monai_umed.data.synthetic.make_demo_dataset`) beside its
output, and with no ``--output_dir`` everything goes to a new temporary folder. Every workflow prints the folders
it wrote.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from monai_umed import protectors
from monai_umed.errors import InputError
from monai_umed.intensity import parse_epsilon
from monai_umed.key import load_protector  # re-exported: part of the bundle's API
from monai_umed.protectors.base import Protector

__all__ = [
    "output_folder",
    "source_dataset",
    "build_protector",
    "load_protector",
    "protect",
    "check_transforms",
    "restore",
    "evaluate",
]


def _print(*lines: str) -> None:
    print("\n".join(lines), flush=True)


def output_folder(output_dir: str | os.PathLike | None, prefix: str = "umed_protect_", name: str = "protected") -> Path:
    """The folder a workflow writes to.

    Args:
        output_dir: the folder given by the user (``--output_dir``); it is returned resolved, and must not exist
            yet (the workflow creates it).
        prefix: prefix of the temporary folder made when ``output_dir`` is None.
        name: name of the output folder inside that temporary folder.

    Returns:
        ``output_dir`` resolved, or ``<new temporary folder>/<name>``.

    Raises:
        InputError: ``output_dir`` already exists.
    """
    if output_dir is None or str(output_dir) == "":
        return Path(tempfile.mkdtemp(prefix=prefix)).resolve() / name
    out = Path(output_dir).expanduser().resolve()
    if out.exists():
        raise InputError("output folder already exists", out)
    return out


def source_dataset(
    dataset_dir: str | os.PathLike | None,
    output: str | os.PathLike,
    synthetic_dir: str | os.PathLike | None = None,
    synthetic: Mapping[str, Any] | None = None,
) -> Path:
    """The dataset a workflow reads: the user's, or the embedded synthetic one written for the occasion.

    Args:
        dataset_dir: the user's dataset (``dataset.json``, its folder, an ``images/`` + ``labels/`` folder or DICOM
            series); None writes the synthetic dataset.
        output: the workflow's output folder; the synthetic dataset goes beside it as ``<output>_source`` unless
            ``synthetic_dir`` is given.
        synthetic_dir: where to write the synthetic dataset (must not exist or be empty).
        synthetic: keyword arguments of :func:`monai_umed.data.synthetic.make_demo_dataset` (``spatial_dims``,
            ``n_train``, ``n_test``, ``size``, ``rgb``, ``num_classes``, ``seed``).

    Returns:
        The dataset path (resolved).

    Raises:
        InputError: ``dataset_dir`` does not exist, or ``synthetic_dir`` exists and is not empty.
    """
    if dataset_dir is not None and str(dataset_dir) != "":
        src = Path(dataset_dir).expanduser().resolve()
        if not src.exists():
            raise InputError("dataset not found", src)
        return src
    from monai_umed.data.synthetic import make_demo_dataset

    out = Path(output).resolve()
    target = Path(synthetic_dir).expanduser().resolve() if synthetic_dir else out.with_name(out.name + "_source")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise InputError("folder for the synthetic dataset exists and is not empty", target)
    root = make_demo_dataset(target, **dict(synthetic or {}))
    _print(f"synthetic dataset: {root} (no --dataset_dir given)")
    return Path(root).resolve()


def build_protector(
    method: str = "umed",
    epsilon: float | str = "8/255",
    epochs: int | None = None,
    seed: int = 0,
    device: str = "auto",
    params: Mapping[str, Any] | None = None,
    protector_file: str | os.PathLike | None = None,
) -> Protector:
    """A protector from the registry (:func:`monai_umed.protectors.get`), optionally with fitted weights.

    Args:
        method: protector name (see :func:`monai_umed.protectors.names`).
        epsilon: L-inf budget in normalised units, a float or a fraction such as ``"8/255"``.
        epochs: bound on fitting (None: the method's default; ignored by methods that fit nothing).
        seed: run seed.
        device: ``auto`` | ``cpu`` | ``cuda``.
        params: other method parameters (e.g. ``{"theta": 0.7, "contour_radius": 2}`` for UMed).
        protector_file: a fitted protector state (``torch.save`` of ``state_dict()``, e.g. written by
            :func:`protect` with ``export_protector`` into the bundle's ``models/``); the protector is then used
            as it is, not refitted.

    Returns:
        The protector (fitted when ``protector_file`` is given).

    Raises:
        InputError: unknown method, bad parameter or epsilon, missing or mismatching ``protector_file``.
    """
    try:
        kwargs: dict[str, Any] = dict(params or {})
        kwargs.update(epsilon=parse_epsilon(epsilon), seed=int(seed), device=device)
        if epochs is not None:
            kwargs["epochs"] = int(epochs)
        protector = protectors.get(str(method), **kwargs)
    except ValueError as e:
        raise InputError(str(e)) from e
    if protector_file is not None and str(protector_file) != "":
        path = Path(protector_file).expanduser().resolve()
        if not path.is_file():
            raise InputError("protector file not found", path)
        try:
            protector.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))
        except (ValueError, KeyError, RuntimeError) as e:
            raise InputError(f"cannot load this protector state into {method!r}: {e}", path) from e
    return protector


def protect(
    dataset: str | os.PathLike,
    output: str | os.PathLike,
    protector: Protector,
    key: str | os.PathLike | None = None,
    split: str = "all",
    intensity: str = "auto",
    batch_size: int = 8,
    new_uids: bool = False,
    resume: bool = False,
    progress: bool = True,
    export_protector: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Run :func:`monai_umed.pipeline.protect_dataset` with a protector built by the bundle and print where it wrote.

    The protector is fitted in place on the training cases (unless it is already fitted), so components that
    reference the same protector afterwards (e.g. a ``Protectd`` in the bundle's ``preprocessing``) use the fitted
    one.

    Args:
        dataset: the dataset to protect.
        output: new folder for the protected copy.
        protector: the protector (see :func:`build_protector`).
        key: key file; None puts ``<output>.umedkey`` beside the output.
        split: ``all`` (protect every listed image) or ``training`` (protect the training list, copy the rest:
            what the ``evaluate`` workflow expects).
        intensity: native -> ``[0, 1]`` mapping (``auto``, ``dtype``, ``window``, ``minmax``, ``percentile``).
        batch_size: cases per perturbation batch.
        new_uids: DICOM: give written files new SOPInstanceUIDs.
        resume: continue an interrupted run with the same settings.
        progress: show progress bars.
        export_protector: also save the fitted protector's ``state_dict`` there (e.g. the bundle's
            ``models/protector.pt``), for reuse with ``protector_file``.

    Returns:
        The summary of :func:`~monai_umed.pipeline.protect_dataset` (``output``, ``key``, ``manifest``, ...).

    Raises:
        InputError: any bad input (see :func:`~monai_umed.pipeline.protect_dataset`).
    """
    from monai_umed.pipeline import protect_dataset

    export = None
    if export_protector is not None and str(export_protector) != "":
        export = Path(export_protector).expanduser().resolve()
        if export.exists():
            raise InputError("protector export file already exists", export)
    summary = protect_dataset(
        dataset, output, protector.name, key=key, split=split, intensity=intensity, batch_size=int(batch_size),
        new_uids=bool(new_uids), resume=bool(resume), progress=bool(progress), protector=protector,
    )
    lines = [
        f"protected {summary['protected']} of {summary['cases']} images with {summary['method']} "
        f"(PSNR mean {summary['psnr_mean']:.2f} dB, min {summary['psnr_min']:.2f} dB, "
        f"max |delta| {summary['max_abs_delta']:.4g} native units) in {summary['seconds']:.1f} s",
        f"output:   {summary['output']}",
        f"manifest: {summary['manifest']}",
        f"key:      {summary['key']} (keep it private)",
    ]
    if export is not None:
        export.parent.mkdir(parents=True, exist_ok=True)
        torch.save(protector.state_dict(), export)
        lines.append(f"protector: {export}")
        summary["protector_file"] = str(export)
    _print(*lines)
    return summary


def _first_file_case(dataset: str | os.PathLike) -> tuple[dict[str, str], str] | None:
    """First training case (else first case) whose image and label are single files MONAI's ``LoadImaged`` reads."""
    from monai_umed.data.datalist import load_dataset

    spec = load_dataset(dataset)
    cases = sorted(spec.cases, key=lambda c: c.split != "training")
    for case in cases:
        if isinstance(case.image, str) and case.label is not None and not case.label.lower().endswith(".dcm"):
            return {"image": str(spec.abspath(case.image)), "label": str(spec.abspath(case.label))}, case.case_id
    return None


def check_transforms(transform: Any, dataset: str | os.PathLike, epsilon: float | str) -> dict[str, Any]:
    """Run a protection ``Compose`` (e.g. the bundle's ``preprocessing``) on one case and undo it.

    This is how a user adds protection to their own MONAI pipeline; the check shows that the chain keeps the
    perturbation within the budget and that ``Compose.inverse`` gives back exactly what the chain produces without
    its ``Protectd``.

    Args:
        transform: a ``monai.transforms.Compose`` of dictionary transforms holding a
            :class:`~monai_umed.transforms.Protectd` on ``image`` (e.g. ``LoadImaged`` -> ``ScaleIntensityd`` ->
            ``Protectd``).
        dataset: the dataset whose first training case (image and label files) is used.
        epsilon: the protector's budget, to report against.

    Returns:
        ``case_id``, ``max_abs_delta`` (normalised units), ``changed_fraction``, ``epsilon`` and ``inverse_exact``;
        an empty dict when the dataset has no single-file case (DICOM series are read by the package's codec).

    Raises:
        InputError: ``transform`` holds no ``Protectd``, the perturbation exceeds the budget or the inverse is not
            exact.
    """
    from monai.transforms import Compose

    from monai_umed.transforms import Protectd

    chain = list(transform.transforms) if isinstance(transform, Compose) else []
    if not any(isinstance(t, Protectd) for t in chain):
        raise InputError("the transform to check must be a Compose holding a Protectd")
    eps = parse_epsilon(epsilon)
    found = _first_file_case(dataset)
    if found is None:
        _print("transform check skipped: no case with single-file image and label (DICOM series)")
        return {}
    item, case_id = found
    clean = Compose([t for t in chain if not isinstance(t, Protectd)])(dict(item))["image"]
    out = transform(dict(item))
    back = transform.inverse(dict(out))["image"]
    clean_t, prot_t, back_t = (torch.as_tensor(np.asarray(v.detach().cpu())) for v in (clean, out["image"], back))
    delta = prot_t.double() - clean_t.double()
    max_delta = float(delta.abs().max()) if delta.numel() else 0.0
    result = {
        "case_id": case_id,
        "max_abs_delta": max_delta,
        "changed_fraction": float((delta != 0).double().mean()) if delta.numel() else 0.0,
        "epsilon": eps,
        "inverse_exact": bool(torch.equal(back_t, clean_t)),
    }
    if max_delta > eps + 1e-6:
        raise InputError(f"the transform chain changed the image by {max_delta:.4g} > epsilon {eps:.4g}", item["image"])
    if not result["inverse_exact"]:
        raise InputError("Compose.inverse did not give back the unprotected image", item["image"])
    _print(f"MONAI transform chain on {case_id}: max |delta| {max_delta * 255:.3g}/255 (budget {eps * 255:.3g}/255), "
           f"{result['changed_fraction']:.1%} of voxels changed; Compose.inverse gives back the clean image exactly")
    return result


def restore(
    protected: str | os.PathLike | None,
    key: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Rebuild the original dataset from a protected copy and its key, and print where it wrote.

    Args:
        protected: the protected dataset folder (``--dataset_dir``).
        key: its key; None uses ``<protected>.umedkey`` beside it.
        output_dir: new folder for the restored dataset; None: ``restored`` in a new temporary folder.
        progress: show a progress bar.

    Returns:
        The summary of :func:`monai_umed.key.restore_dataset` (``output``, ``cases``, ``restored``).

    Raises:
        InputError: no ``protected`` folder given, or a key that does not match it.
    """
    from monai_umed.key import restore_dataset
    from monai_umed.pipeline import default_key_path

    if protected is None or str(protected) == "":
        raise InputError("pass the protected dataset folder with --dataset_dir")
    src = Path(protected).expanduser().resolve()
    if not src.is_dir():
        raise InputError("protected dataset folder not found", src)
    key_path = Path(key).expanduser().resolve() if key else default_key_path(src)
    if not key_path.is_file():
        raise InputError("key file not found (pass it with --key_file)", key_path)
    output = output_folder(output_dir, prefix="umed_restore_", name="restored")
    summary = restore_dataset(src, key_path, output, progress=bool(progress))
    _print(f"restored {summary['restored']} images ({summary['cases']} cases) bit for bit",
           f"output:   {summary['output']}")
    return summary


def _fmt(value: Any, pct: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}%" if pct else f"{value:.2f}"


def evaluate(
    protected: str | os.PathLike | None,
    clean: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    victim: str = "unet",
    defences: Sequence[str] | str = ("none",),
    epochs: int | None = None,
    seed: int = 0,
    image_size: int | Sequence[int] | None = None,
    device: str = "auto",
    epsilon: float | str | None = None,
    figure: bool = True,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    batch_size: int | None = None,
    lr: float | None = None,
    intensity: str = "auto",
    patch_size: Sequence[int] | None = None,
    victim_params: Mapping[str, Any] | None = None,
    test_key: str = "test",
    progress: bool = True,
) -> dict[str, Any]:
    """Judge a protected dataset with :func:`monai_umed.evaluation.evaluate` and print where the report went.

    Two victims are trained with the same recipe, one on the clean training images and one on the protected ones,
    and both are tested on the clean test images (METHODS.md section 4).

    Args:
        protected: the protected dataset folder (``--dataset_dir``), written by the ``protect`` workflow.
        clean: the clean dataset; None uses the source recorded in the protected folder's ``manifest.json``.
        output_dir: new folder for ``report.json``, ``report.md`` and ``figure.png``; None: ``evaluation/`` in a
            new temporary folder.
        victim: ``unet`` or ``swinunetr``.
        defences: defence specs, one report row each (``none``, ``jpeg:quality=50``, ``blur``, ...).
        epochs: victim training epochs (None: the evaluation default for the data's dimensionality).
        seed: victim seed.
        image_size: size the victim resizes every image to (None keeps the native size).
        device: ``auto`` | ``cpu`` | ``cuda``.
        epsilon: the protection budget (for defences that scale with it); None reads it from the manifest.
        figure: also draw ``figure.png``.
        cache_dir: where trained victims are cached (None: the evaluation default).
        use_cache: reuse and store trained victims.
        batch_size: victim batch size (None: the evaluation default).
        lr: victim learning rate (None: the evaluation default).
        intensity: the victim's intensity scaling.
        patch_size: victim training patch (None: sized from the data).
        victim_params: victim network constructor overrides.
        test_key: the clean dataset's list used for testing.
        progress: progress messages and bars.

    Returns:
        The evaluation report (see :data:`monai_umed.evaluation.report.REPORT_KEYS`).

    Raises:
        InputError: no protected folder, no clean dataset, or what :func:`monai_umed.evaluation.evaluate` rejects.
    """
    import json

    from monai_umed.evaluation import evaluate as evaluate_protection

    if protected is None or str(protected) == "":
        raise InputError("pass the protected dataset folder with --dataset_dir")
    prot = Path(protected).expanduser().resolve()
    if not prot.is_dir():
        raise InputError("protected dataset folder not found", prot)
    summary: dict[str, Any] = {}
    if (prot / "manifest.json").is_file():
        summary = json.loads((prot / "manifest.json").read_text()).get("summary", {})
    if clean is None or str(clean) == "":
        if not summary.get("dataset"):
            raise InputError("no manifest.json names the clean dataset: pass it with --clean_dir", prot)
        clean = summary["dataset"]
    clean_path = Path(clean).expanduser().resolve()
    if not clean_path.exists():
        raise InputError("clean dataset not found (pass it with --clean_dir)", clean_path)
    if epsilon is None:
        epsilon = summary.get("params", {}).get("epsilon", 8 / 255)
    out = output_folder(output_dir, prefix="umed_evaluate_", name="evaluation")
    out.mkdir(parents=True)
    report = evaluate_protection(
        clean_path, prot, victim=victim, defences=[defences] if isinstance(defences, str) else list(defences),
        epochs=epochs, seed=int(seed), image_size=image_size, device=device, report=out / "report.json",
        figure=out / "figure.png" if figure else None, cache_dir=cache_dir, use_cache=bool(use_cache),
        batch_size=batch_size, lr=lr, intensity=intensity, patch_size=patch_size,
        victim_params=dict(victim_params or {}), epsilon=parse_epsilon(epsilon), test_key=test_key,
        progress=bool(progress),
    )
    lines = [f"victim {report['victim']}, {report['epochs']} epochs, seed {report['seed']}: Dice on "
             f"{report['datasets']['test_cases']} clean test images"]
    for row in report["rows"]:
        lines.append(f"  defence {row['defence']}: trained on clean {_fmt(row['dice_clean'], True)}, "
                     f"on protected {_fmt(row['dice_protected'], True)}")
    lines += [f"PSNR {_fmt(report['psnr'])} dB (ROI {_fmt(report['psnr_roi'])} dB), SSIM {_fmt(report['ssim'])}",
              f"report:   {out / 'report.json'}", f"table:    {report['report_markdown']}"]
    if report.get("figure"):
        lines.append(f"figure:   {report['figure']}")
    _print(*lines)
    return report
