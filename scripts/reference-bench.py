#!/usr/bin/env python3
"""CPU timings of the reference PyTorch IDiff-Face models, for comparison with IDiff Studio.

The models are imported from a checkout of the reference repository (fdbtrs/IDiff-Face) that
the user supplies with --reference-repo; none of its code lives in this repository (its
licence is CC BY-NC-SA). Weights are random (each model's own constructor init), so only the
timings mean anything.

Setup (tested with Python 3.11, torch 2.15.0 from PyPI):

    git clone https://github.com/fdbtrs/IDiff-Face /path/to/IDiff-Face
    python3 -m venv /path/to/venv
    /path/to/venv/bin/pip install torch einops pyyaml

PyPI's Linux torch wheel is a CUDA build: `pip install --no-deps torch` alone does not import
(libtorch_cpu.so itself links libcudart / libcupti), so the normal install, nvidia-* wheels
included (about 5 GiB of venv), is needed; no GPU is used. pyyaml is optional: with it the
script checks its hard-coded configs against the repo's yaml files. pytorch_lightning is not
needed: the reference's utils/helpers.py imports it only for `rank_zero_only`, which this
script stubs.

Usage:

    /path/to/venv/bin/python scripts/reference-bench.py --reference-repo /path/to/IDiff-Face \\
        [--out ref.json] [--threads 2] [--repeats 3] [--only NAME[,NAME...]]

then, on the same machine and in the same session, `idiff-studio bench --reference ref.json`
prints its rows beside the times in this file, with the ratio ours/reference.

Rows (ms_per_image = wall ms of one call / batch; one warm-up call, then the best of
--repeats calls; forwards in eval mode under torch.no_grad()):

    unet-fixture-forward      b 1, 8, 32  ConditionalUNet, CA, ch 32, mult [1,1,2,2], 32x32x3
    unet-released-forward     b 1, 8, 32  ConditionalUNet, CA, ch 96, mult [1,2,2,2], ctx 256
                                          (configs/model/unet_cond_ca.yaml)
    vq-f4-decode-128px        b 1, 8      post_quant_conv + LDM VQ-f4 Decoder, 32x32x3 -> 128px
    iresnet50-forward         b 1, 8, 32  utils/iresnet.py iresnet50, 112x112 -> 512
    default-unet-train-step   b 32        assets/default/unet.json U-Net: forward, MSE,
                                          backward, AdamW(lr 1e-4, wd 0) step, zero_grad
                                          (the row also has ms_per_step)

Notes: the VQ row skips the 8192-code quantizer that the reference's VQDecoderInterface runs
by default (about 75-90 ms/image more at 2 threads on a busy 2-core Xeon). The train step
runs the reference as it is, so its cross-attention MultiHeadAttention blocks use their
gradient checkpointing (forward recomputed in backward) and context dropout p=0.25 is on.
Timings with 2 threads are very noisy when other processes share the cores (OpenMP threads
wait on a descheduled peer); compare only numbers taken on a quiet machine.

Each row is printed as it is measured; --out writes
{"tool", "torch", "threads", "cpu", "flush_denormal", "repeats", "rows", "params"}, where
"params" gives each model's parameter count.
"""

import argparse
import json
import sys
import time
import types
import warnings
from pathlib import Path

ROW_NAMES = [
    "unet-fixture-forward",
    "unet-released-forward",
    "vq-f4-decode-128px",
    "iresnet50-forward",
    "default-unet-train-step",
]

REQUIRED_FILES = [
    "models/diffusion/unet.py",
    "models/diffusion/nn.py",
    "models/autoencoder/modules.py",
    "utils/helpers.py",
    "utils/checkpoint.py",
    "utils/iresnet.py",
]

UNET_FIXTURE = dict(
    input_channels=3, initial_channels=32, channel_multipliers=[1, 1, 2, 2],
    is_attention=[False, True, True, True], attention_heads=-1, attention_head_channels=32,
    n_blocks_per_resolution=2, condition_type="CA", context_input_channels=512,
    context_channels=64, is_context_conditional=True, n_context_classes=0,
    learn_empty_context=False,
)

# configs/model/unet_cond_ca.yaml of the reference (input_channels 3 and n_classes 0 come
# from configs/dataset/ffhq_folder.yaml); context dropout is a no-op in eval mode.
UNET_RELEASED = dict(UNET_FIXTURE, initial_channels=96, channel_multipliers=[1, 2, 2, 2],
                     context_channels=256)

# models/autoencoder/first_stage_config.yaml (LDM vq-f4) ddconfig, but resolution 128: the
# decoder is fully convolutional and resolution only sets z_shape and where attention goes
# (attn_resolutions is empty), so 128 makes a 32x32 latent the nominal one.
VQ_F4_DDCONFIG = dict(
    double_z=False, z_channels=3, resolution=128, in_channels=3, out_ch=3, ch=128,
    ch_mult=[1, 2, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0,
)
VQ_EMBED_DIM = 3

# Used when assets/default/unet.json is not found next to this script.
DEFAULT_UNET_FALLBACK = {
    "initial_channels": 32, "channel_multipliers": [1, 2, 2], "is_attention": [False, True, True],
    "attention_heads": -1, "attention_head_channels": 32, "n_blocks_per_resolution": 1,
    "context_input_channels": 64, "context_channels": 64, "input_channels": 3,
    "context_dropout_probability": 0.25, "condition_type": "CA", "latent_size": 16,
}
UNET_KEYS = ["input_channels", "initial_channels", "channel_multipliers", "is_attention",
             "attention_heads", "attention_head_channels", "n_blocks_per_resolution",
             "condition_type", "context_input_channels", "context_channels",
             "context_dropout_probability"]


def die(msg):
    print(f"reference-bench: error: {msg}", file=sys.stderr)
    sys.exit(2)


def warn(msg):
    print(f"reference-bench: warning: {msg}", file=sys.stderr)


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def stub_pytorch_lightning():
    """utils/helpers.py does `from pytorch_lightning.utilities import rank_zero_only`."""
    def rank_zero_only(fn):
        return fn

    pl = types.ModuleType("pytorch_lightning")
    utilities = types.ModuleType("pytorch_lightning.utilities")
    utilities.rank_zero_only = rank_zero_only
    pl.utilities = utilities
    sys.modules["pytorch_lightning"] = pl
    sys.modules["pytorch_lightning.utilities"] = utilities


def import_reference(repo):
    repo = Path(repo)
    if not repo.is_dir():
        die(f"reference repo {repo} does not exist or is not a directory")
    missing = [p for p in REQUIRED_FILES if not (repo / p).is_file()]
    if missing:
        die(f"{repo} is not an IDiff-Face checkout: missing {', '.join(missing)}")
    stub_pytorch_lightning()
    # utils/iresnet.py wraps its forward in torch.cuda.amp.autocast(False): deprecated, harmless
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*autocast.*")
    sys.path.insert(0, str(repo.resolve()))
    try:
        from models.diffusion.unet import ConditionalUNet
        from models.autoencoder.modules import Decoder
        from utils.iresnet import iresnet50
    except Exception as e:  # ImportError, or a missing dependency such as einops
        die(f"cannot import the reference modules from {repo}: {type(e).__name__}: {e}")
    return ConditionalUNet, Decoder, iresnet50


def check_yaml(path, expected):
    """Warn where the repo's yaml disagrees with a hard-coded config (needs pyyaml)."""
    try:
        import yaml
    except ImportError:
        return
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
    except Exception as e:
        warn(f"cannot read {path}: {e}")
        return
    for key, want in expected.items():
        got = cfg.get(key) if isinstance(cfg, dict) else None
        if isinstance(got, str) and got.startswith("${"):
            continue  # hydra interpolation, resolved elsewhere
        if got != want:
            warn(f"{path}: {key} is {got!r}, the bench uses {want!r}")


def load_default_unet_config():
    path = Path(__file__).resolve().parent.parent / "assets" / "default" / "unet.json"
    try:
        with open(path) as f:
            cfg = json.load(f)
    except OSError:
        warn(f"{path} not found; using the built-in copy of the default U-Net config")
        cfg = dict(DEFAULT_UNET_FALLBACK)
    kwargs = {k: cfg[k] for k in UNET_KEYS if k in cfg}
    kwargs.update(is_context_conditional=True, n_context_classes=0, learn_empty_context=False)
    return kwargs, int(cfg.get("latent_size", 16))


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def best_ms(fn, repeats):
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference-repo", required=True, metavar="DIR",
                    help="checkout of github.com/fdbtrs/IDiff-Face")
    ap.add_argument("--out", metavar="FILE", help="write the results as JSON here")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per row, best kept (default 3)")
    ap.add_argument("--only", metavar="NAME[,NAME]", help="run only these rows: " + ", ".join(ROW_NAMES))
    args = ap.parse_args()

    if args.threads < 1 or args.repeats < 1:
        die("--threads and --repeats must be at least 1")
    only = ROW_NAMES
    if args.only:
        only = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in only if n not in ROW_NAMES]
        if unknown:
            die(f"unknown row name(s) {', '.join(unknown)}; known: {', '.join(ROW_NAMES)}")

    try:
        import torch
    except ImportError:
        die("torch is not installed in this Python (see the setup in the script's docstring)")

    ConditionalUNet, Decoder, iresnet50 = import_reference(args.reference_repo)
    repo = Path(args.reference_repo)

    torch.set_num_threads(args.threads)
    flush_denormal = bool(torch.set_flush_denormal(True))
    if not flush_denormal:
        warn("torch.set_flush_denormal(True) is not supported on this CPU")
    torch.manual_seed(0)

    rows = []
    params = {}

    def record(name, batch, ms_call, **extra):
        row = {"name": name, "batch": batch, "ms_per_image": round(ms_call / batch, 4)}
        row.update(extra)
        rows.append(row)
        print(f"{name:<26} {batch:>3} {ms_call / batch:>11.3f} ms/image", flush=True)

    print(f"torch {torch.__version__}, {args.threads} thread(s), {cpu_model()}", flush=True)
    print(f"{'name':<26} {'batch':>3} {'ms/image':>20}", flush=True)

    def bench_unet(name, kwargs, batches, latent=32):
        model = ConditionalUNet(**kwargs).eval()
        params[name] = n_params(model)
        cin = kwargs["input_channels"]
        for b in batches:
            x = torch.randn(b, cin, latent, latent)
            t = torch.full((b,), 500, dtype=torch.int64)
            ctx = torch.randn(b, kwargs["context_input_channels"])
            with torch.no_grad():
                out = model(x, t, ctx)
                assert out.shape == x.shape, out.shape
                ms = best_ms(lambda: model(x, t, ctx), args.repeats)
            record(name, b, ms)

    if "unet-fixture-forward" in only:
        bench_unet("unet-fixture-forward", UNET_FIXTURE, [1, 8, 32])

    if "unet-released-forward" in only:
        check_yaml(repo / "configs/model/unet_cond_ca.yaml",
                   {k: v for k, v in UNET_RELEASED.items() if k != "n_context_classes"})
        bench_unet("unet-released-forward", UNET_RELEASED, [1, 8, 32])

    if "vq-f4-decode-128px" in only:
        ae_cfg = repo / "models/autoencoder/first_stage_config.yaml"
        try:
            import yaml
            with open(ae_cfg) as f:
                dd = yaml.safe_load(f)["params"]["ddconfig"]
            for k, v in VQ_F4_DDCONFIG.items():
                if k != "resolution" and dd.get(k) != v:
                    warn(f"{ae_cfg}: ddconfig.{k} is {dd.get(k)!r}, the bench uses {v!r}")
        except ImportError:
            pass
        except Exception as e:
            warn(f"cannot read {ae_cfg}: {e}")
        decoder = Decoder(**VQ_F4_DDCONFIG).eval()
        post_quant_conv = torch.nn.Conv2d(VQ_EMBED_DIM, VQ_F4_DDCONFIG["z_channels"], 1).eval()
        params["vq-f4-decode-128px"] = n_params(decoder) + n_params(post_quant_conv)

        def decode(z):
            return decoder(post_quant_conv(z))

        for b in [1, 8]:
            z = torch.randn(b, VQ_EMBED_DIM, 32, 32)
            with torch.no_grad():
                out = decode(z)
                assert tuple(out.shape) == (b, 3, 128, 128), out.shape
                ms = best_ms(lambda: decode(z), args.repeats)
            record("vq-f4-decode-128px", b, ms)

    if "iresnet50-forward" in only:
        model = iresnet50().eval()
        params["iresnet50-forward"] = n_params(model)
        for b in [1, 8, 32]:
            x = torch.randn(b, 3, 112, 112)
            with torch.no_grad():
                out = model(x)
                assert tuple(out.shape) == (b, 512), out.shape
                ms = best_ms(lambda: model(x), args.repeats)
            record("iresnet50-forward", b, ms)

    if "default-unet-train-step" in only:
        kwargs, latent = load_default_unet_config()
        model = ConditionalUNet(**kwargs).train()
        params["default-unet-train-step"] = n_params(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
        b = 32
        cin = kwargs["input_channels"]
        x = torch.randn(b, cin, latent, latent)
        t = torch.randint(0, 1000, (b,), dtype=torch.int64)
        ctx = torch.randn(b, kwargs["context_input_channels"])
        target = torch.randn(b, cin, latent, latent)

        def step():
            loss = torch.nn.functional.mse_loss(model(x, t, ctx), target)
            loss.backward()
            opt.step()
            opt.zero_grad()

        ms = best_ms(step, args.repeats)
        record("default-unet-train-step", b, ms, ms_per_step=round(ms, 3))

    result = {
        "tool": "reference-bench",
        "torch": torch.__version__,
        "threads": args.threads,
        "cpu": cpu_model(),
        "flush_denormal": flush_denormal,
        "repeats": args.repeats,
        "rows": rows,
        "params": params,
    }
    if args.out:
        out = Path(args.out)
        if out.parent and not out.parent.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
