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

"""Exploratory experiment (not a protector): error-minimising noise on the victim's pixel grid at >= 50 dB.

Per training case, a delta on a ``--work`` x ``--work`` grid is upsampled bilinearly to the file's size,
clamped to a per-case amplitude in whole grey levels (the largest <= ``--eps`` that keeps the whole-image PSNR
at ``--psnr``), confined to the ROI plus a ``--radius`` contour band, rounded straight-through, then passed
through a stand-in of MONAI's anti-aliased ``Resize`` and min-max scaling before a UNet surrogate sees it.
Min-min: per round, one surrogate epoch then ``--pgd`` sign-descent steps of half the amplitude, with flips and
90-degree rotations. The protected training PNGs are written with the project's codec and the project's UNet
victim is trained on them and tested on the clean test list. 2D, equal-size images (Kvasir-SEG), CPU.

    python benchmarks/em_victim_grid.py --name e1 --rounds 4 --pgd 4 --eps 4 --psnr 49
    python benchmarks/em_victim_grid.py --name e2 --n-train 200 --rounds 10 --pgd 5 --eps 4 --psnr 49

Results are in ``docs/methods.md`` ("Measured efficacy"); they motivate a per-sample refinement stage for UMed.
"""

import argparse, json, time
from pathlib import Path
import numpy as np, torch, torch.nn.functional as F
from monai_umed.data.datalist import load_dataset
from monai_umed.data.formats import codec_for
from monai_umed.intensity import quantise
from monai_umed.pipeline import _psnr, load_case
from monai_umed.masks import contour_band, roi_mask
from monai_umed.protectors.surrogate import Surrogate, augment_pair
from monai_umed.protectors.release import gaussian_blur
from monai_umed.evaluation.train import make_config, describe_data, train_victim, evaluate_victim, load_split

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--data", default="../shared/data/kvasir_seg")
ap.add_argument("--name", required=True)
ap.add_argument("--work", type=int, default=128)
ap.add_argument("--eps", type=float, default=3)  # grey levels
ap.add_argument("--psnr", type=float, default=50.5)
ap.add_argument("--radius", type=float, default=3)
ap.add_argument("--rounds", type=int, default=6)
ap.add_argument("--pgd", type=int, default=5)
ap.add_argument("--bs", type=int, default=16)
ap.add_argument("--n-train", type=int, default=0)
ap.add_argument("--victim-epochs", type=int, default=10)
ap.add_argument("--out", default="em_victim_grid_out", help="output folder (one subfolder per --name)")
a = ap.parse_args()
torch.set_num_threads(2)
torch.manual_seed(0)
out = Path(a.out) / a.name
out.mkdir(parents=True, exist_ok=True)
spec = load_dataset(a.data)
cases = [c for c in spec.cases if c.split == "training"][: a.n_train or None]
t0 = time.time()
loaded = [load_case(spec, c) for c in cases]
X = torch.stack([lc.tensor.float() for lc in loaded])
Y = torch.stack([torch.as_tensor(lc.label).long() for lc in loaded])
M = torch.stack([(roi_mask(lc.label) | contour_band(lc.label, radius=a.radius)) for lc in loaded]).float()
frac = M.mean(dim=(1, 2, 3))
# per-case amplitude in whole grey levels so that (amp^2 * frac) keeps whole-image PSNR >= target (all channels)
amp = torch.clamp(torch.floor(torch.sqrt((255.0 ** 2) * 10 ** (-a.psnr / 10) / frac.clamp_min(1e-6))), 1, a.eps)
A = (amp / 255.0).view(-1, 1, 1, 1)
print(f"loaded {len(loaded)} in {time.time()-t0:.0f}s; amp levels hist {torch.bincount(amp.long()).tolist()}", flush=True)
N, C, H, W = X.shape
size = (a.work, a.work)
sig = [(H / a.work - 1) / 2, (W / a.work - 1) / 2]


def down(x):  # MONAI Resize(anti_aliasing=True) stand-in
    return F.interpolate(gaussian_blur(x, sig), size=size, mode="bilinear", align_corners=False)


def protected_low(idx, d):
    up = F.interpolate(d, size=(H, W), mode="bilinear", align_corners=False)
    delta = torch.maximum(torch.minimum(up, A[idx]), -A[idx]) * M[idx]
    xp = X[idx] + delta
    xp = xp + ((xp * 255).round() / 255 - xp).detach()
    xp = xp.clamp(0, 1)
    lo = down(xp)
    mn, mx = lo.amin(dim=(1, 2, 3), keepdim=True), lo.amax(dim=(1, 2, 3), keepdim=True)
    return (lo - mn) / (mx - mn).clamp_min(1e-6)


Ylow = F.interpolate(Y.float(), size=size, mode="nearest").long()
D = torch.zeros(N, C, *size)
sur = Surrogate(2, C, 2, channels=(16, 32, 64, 128), lr=1e-3, seed=0)
g = torch.Generator().manual_seed(0)
hist = []
for r in range(a.rounds):
    order = torch.randperm(N, generator=g)
    dices, losses = [], []
    for i in range(0, N, a.bs):
        idx = order[i:i + a.bs]
        with torch.no_grad():
            xl = protected_low(idx, D[idx])
        xa, ya = augment_pair(xl, Ylow[idx], g)
        sur.model.train()
        sur.optimizer.zero_grad()
        lg = sur.logits(xa)
        l = sur.loss_fn(lg, ya)
        l.backward(); sur.optimizer.step()
        p = lg.argmax(1, keepdim=True)
        dices.append(float(2 * ((p == 1) & (ya == 1)).sum() / ((p == 1).sum() + (ya == 1).sum()).clamp_min(1)))
    sur.model.eval()
    sur.model.requires_grad_(False)
    for i in range(0, N, a.bs):
        idx = order[i:i + a.bs]
        d = D[idx].clone()
        alpha = A[idx] / 2
        for s in range(a.pgd):
            d.requires_grad_(True)
            xa, ya = augment_pair(protected_low(idx, d), Ylow[idx], g)
            l = sur.loss(xa, ya)
            gr, = torch.autograd.grad(l, d)
            with torch.no_grad():
                d = torch.maximum(torch.minimum(d - alpha * gr.sign(), A[idx]), -A[idx])
            losses.append(float(l.detach()))
        D[idx] = d.detach()
    sur.model.requires_grad_(True)
    hist.append((r, float(np.mean(dices)), float(np.mean(losses))))
    print(f"round {r} sur-train-dice {np.mean(dices):.3f} pgd-loss {np.mean(losses):.3f} t={time.time()-t0:.0f}s", flush=True)
    if np.mean(dices) > 0.97:
        break
train_list, psnrs = [], []
with torch.no_grad():
    for i, lc in enumerate(loaded):
        up = F.interpolate(D[i:i + 1], size=(H, W), mode="bilinear", align_corners=False)[0]
        delta = (torch.maximum(torch.minimum(up, A[i, :]), -A[i, :]) * M[i]).numpy()
        prot, dq = quantise(lc.image.array, delta, lc.mapping, float(A[i].max()))
        psnrs.append(_psnr(dq / lc.mapping.scale(dq.ndim)))
        codec = codec_for(lc.paths[0])
        target = out / "files" / codec.output_relpath(lc.case.image_files[0])
        target.parent.mkdir(parents=True, exist_ok=True)
        codec.write(lc.paths[0], str(target), prot)
        train_list.append({"image": str(target), "label": str(spec.abspath(lc.case.label))})
fin = [p for p in psnrs if np.isfinite(p)]
res = {"name": a.name, "args": vars(a), "psnr_mean": float(np.mean(fin)), "psnr_min": float(np.min(fin)), "hist": hist,
       "fit_s": time.time() - t0}
print(json.dumps(res), flush=True)
info = describe_data(a.data, train_list, 128)
cfg = make_config("unet", info, a.victim_epochs, seed=0, image_size=128)
t1 = time.time()
model, tinfo = train_victim(train_list, cfg, device="cpu", cache_dir=str(Path(a.out) / "victims"), progress=False)
ev = evaluate_victim(model, load_split(a.data, "test"), cfg, device="cpu")
res.update({"dice": ev["dice"], "victim_s": time.time() - t1, "loss": tinfo.get("loss")})
print("RESULT", json.dumps(res), flush=True)
json.dump(res, open(out / "result.json", "w"), indent=1)
