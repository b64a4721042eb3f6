#!/usr/bin/env bash
# Opens the real studio window under Xvfb, loads the tiny fixture model, runs a short job and
# saves a screenshot of the screen. Run on demand (not part of CI):
#
#   scripts/screenshot.sh [OUT.png]      (default assets/screenshots/studio_generate.png)
#   MODEL=default scripts/screenshot.sh assets/screenshots/studio_default.png
#                                        (the built-in default model; needs a build that
#                                         embeds it, i.e. all six assets/default files)
#
# Needs: xvfb xauth imagemagick x11-apps (installed with apt-get when missing), the fixtures
# ($IDIFF_FIXTURES or ../shared/fixtures) and a debug build (built here if needed; BIN=path
# uses another binary, e.g. BIN=target/release/idiff-studio).
# Also prints the UI thread's p50/p99 frame time while the job was sampling.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-assets/screenshots/studio_generate.png}"
fixtures="${IDIFF_FIXTURES:-../shared/fixtures}"
W=1440 H=900

if ! command -v Xvfb >/dev/null || ! command -v import >/dev/null; then
  apt-get update -qq && apt-get install -y -qq --no-install-recommends xvfb xauth imagemagick x11-apps
fi
identity_args=(--identities "${IDENTITIES:-5}")
model_args=(
  --unet "$fixtures/unet_tiny_ema_averaged_model.ckpt" --config "$fixtures/unet_tiny_config.json"
  --decoder "$fixtures/vq_tiny_first_stage_decoder_state_dict.pt"
  --decoder-config "$fixtures/vq_tiny_config.json"
)
if [[ "${MODEL:-fixture}" == default ]]; then
  for f in unet vq fr; do
    [[ -f "assets/default/$f.safetensors" ]] || { echo "assets/default/$f.safetensors missing: no built-in default model" >&2; exit 1; }
  done
  model_args=()
  identity_args=(--procface-identities "${IDENTITIES:-5}")
else
  for f in unet_tiny_ema_averaged_model.ckpt unet_tiny_config.json \
           vq_tiny_first_stage_decoder_state_dict.pt vq_tiny_config.json; do
    [[ -f "$fixtures/$f" ]] || { echo "fixture $fixtures/$f missing (set IDIFF_FIXTURES)" >&2; exit 1; }
  done
fi
bin="${BIN:-target/debug/idiff-studio}"
[[ -n "${SKIP_BUILD:-}${BIN:-}" ]] || cargo build --bin idiff-studio

tmp=$(mktemp -d)
trap 'kill ${app_pid:-} ${xvfb_pid:-} 2>/dev/null || true; rm -rf "$tmp"' EXIT
export XDG_RUNTIME_DIR="$tmp/xdg" && mkdir -m 0700 "$XDG_RUNTIME_DIR"
export HOME="$tmp/home" && mkdir -p "$HOME"   # keeps the user's saved workspace untouched
display=":$((90 + RANDOM % 100))"
Xvfb "$display" -screen 0 "${W}x${H}x24" -nolisten tcp &
xvfb_pid=$!
sleep 1
export DISPLAY="$display"
unset WAYLAND_DISPLAY

"$bin" studio --fresh --size "${W}x${H}" "${model_args[@]}" \
  "${identity_args[@]}" --per-identity "${PER_IDENTITY:-6}" --steps "${STEPS:-10}" \
  --guidance "${GUIDANCE:-1.0}" --seed 7 --run --ready-file "$tmp/ready" &
app_pid=$!
for _ in $(seq 1 1200); do
  [[ -f "$tmp/ready" ]] && break
  kill -0 "$app_pid" 2>/dev/null || { echo "the studio exited early" >&2; exit 1; }
  sleep 0.5
done
[[ -f "$tmp/ready" ]] || { import -window root -display "$display" "${out%.png}.timeout.png"; echo "timed out waiting for the run" >&2; exit 1; }
echo "status: $(cat "$tmp/ready")"
sleep 0.5
mkdir -p "$(dirname "$out")"
import -window root -display "$display" "$tmp/shot.png"
# A 32-colour palette keeps the file under 300 KB (the noisy tiles of the tiny model compress badly).
convert "$tmp/shot.png" +dither -colors "${COLORS:-32}" -define png:compression-level=9 "$out"
echo "screenshot: $out ($(du -k "$out" | cut -f1) KB)"
