#!/usr/bin/env bash
# Fetches the real face models and test photos used by the ONNX tests (src/onnx) into a
# cache folder outside the repository, and verifies every file's SHA-256.
#
#   scripts/fetch-models.sh            # into ${IDIFF_MODELS:-$HOME/.cache/idiff-studio/models}
#   IDIFF_MODELS=/data/models scripts/fetch-models.sh
#
# Sources (fetched with the registries' own clients, nothing is committed):
#   npm  faceplugin-face-recognition-js@0.0.1 (MIT): model/fr_feature.onnx (MobileFaceNet-style
#        recognizer, 112x112 RGB, (x-127)/128, 512-d), model/fr_detect.onnx (RFB-320 detector),
#        model/fr_landmark.onnx (68-point landmarks)
#   PyPI face_recognition==1.3.0 sdist (MIT): tests/test_images/{obama,obama2,obama3,biden}.jpg
#
# Layout of the cache:  fr_feature.onnx (+ fr_feature.json, its input descriptor)
#                       fr_detect.onnx fr_landmark.onnx photos/<name>.jpg
# Idempotent: files already present with the right hash are kept; a wrong hash is an error.
set -euo pipefail

DEST="${IDIFF_MODELS:-$HOME/.cache/idiff-studio/models}"

NPM_SPEC="faceplugin-face-recognition-js@0.0.1"
NPM_TGZ="faceplugin-face-recognition-js-0.0.1.tgz"
NPM_TGZ_SHA=7ea06031d9a3f83753254fcff60506a07b81b46fc84d4ee024cd041f260ec1ba
PYPI_SPEC="face_recognition==1.3.0"
PYPI_TGZ="face_recognition-1.3.0.tar.gz"
PYPI_TGZ_SHA=5e5efdd1686aa566af0d3cc1313b131e4b197657a8ffd03669e6d3fad92705ec

# "<path in cache> <sha256> <path inside the archive>"
MODELS=(
  "fr_feature.onnx 87aacdfe57510db2af90c0251df680e8eec88f122ee94712121d09bcaaaf3581 package/model/fr_feature.onnx"
  "fr_detect.onnx 6c0256ccd3164f844736a401faf936ec2930764a87ae39442180887d0c5c8854 package/model/fr_detect.onnx"
  "fr_landmark.onnx f10b0ba1d2a8a099adefede1ebf3733e44fe370715e7303dbeb7f59c02142258 package/model/fr_landmark.onnx"
)
PHOTOS=(
  "photos/obama.jpg 0930e3aa8cae5920329c0c8cbc6a2ab70f47b0e67b432875beaa95cbf7e741f6 face_recognition-1.3.0/tests/test_images/obama.jpg"
  "photos/obama2.jpg a7efcc907375274796f39646510704aa86672d59f6d5469d69af3c85590976a6 face_recognition-1.3.0/tests/test_images/obama2.jpg"
  "photos/obama3.jpg 76ac6bf97c36dc2da0ad16a537d6a5ac1b10f48d49aac29a0cca9a17cdbc3ca3 face_recognition-1.3.0/tests/test_images/obama3.jpg"
  "photos/biden.jpg 3c17508bb91554c637a2eabddfae790e5bb1caba93130814fc2ac50be9760c4c face_recognition-1.3.0/tests/test_images/biden.jpg"
)

sha() { sha256sum "$1" | cut -d' ' -f1; }

# True when every listed file is present with its hash.
all_ok() {
  local entry rel want
  for entry in "$@"; do
    read -r rel want _ <<<"$entry"
    [[ -f "$DEST/$rel" && "$(sha "$DEST/$rel")" == "$want" ]] || return 1
  done
}

# extract ARCHIVE ENTRY...: unpacks each entry into $DEST and checks its hash.
extract() {
  local archive=$1 entry rel want inner tmp
  shift
  tmp=$(mktemp -d)
  for entry in "$@"; do
    read -r rel want inner <<<"$entry"
    tar -xzf "$archive" -C "$tmp" "$inner"
    local got
    got=$(sha "$tmp/$inner")
    if [[ "$got" != "$want" ]]; then
      echo "fetch-models: $inner in $archive has sha256 $got, expected $want" >&2
      rm -rf "$tmp"
      exit 1
    fi
    mkdir -p "$(dirname "$DEST/$rel")"
    mv -f "$tmp/$inner" "$DEST/$rel"
  done
  rm -rf "$tmp"
}

# check_archive FILE SHA256: fails unless the downloaded archive has the expected hash.
check_archive() {
  local file=$1 want=$2 got
  got=$(sha "$file")
  if [[ "$got" != "$want" ]]; then
    echo "fetch-models: $(basename "$file") has sha256 $got, expected $want" >&2
    exit 1
  fi
}

mkdir -p "$DEST"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if all_ok "${MODELS[@]}"; then
  echo "fetch-models: models present in $DEST"
else
  command -v npm >/dev/null || { echo "fetch-models: npm is required to fetch $NPM_SPEC" >&2; exit 1; }
  (cd "$work" && npm pack --silent "$NPM_SPEC" >/dev/null)
  check_archive "$work/$NPM_TGZ" "$NPM_TGZ_SHA"
  extract "$work/$NPM_TGZ" "${MODELS[@]}"
  echo "fetch-models: models written to $DEST"
fi
# The recognizer's input descriptor (src/onnx/fr.rs): MobileFaceNet-style (x-127)/128, RGB.
echo '{"preset": "mobilefacenet"}' > "$DEST/fr_feature.json"

if all_ok "${PHOTOS[@]}"; then
  echo "fetch-models: photos present in $DEST/photos"
else
  PIP=$(command -v pip3 || command -v pip || true)
  [[ -n "$PIP" ]] || { echo "fetch-models: pip is required to fetch $PYPI_SPEC" >&2; exit 1; }
  "$PIP" download --quiet --no-deps --no-binary :all: "$PYPI_SPEC" -d "$work" >/dev/null
  check_archive "$work/$PYPI_TGZ" "$PYPI_TGZ_SHA"
  extract "$work/$PYPI_TGZ" "${PHOTOS[@]}"
  echo "fetch-models: photos written to $DEST/photos"
fi
