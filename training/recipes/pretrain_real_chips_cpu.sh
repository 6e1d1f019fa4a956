#!/usr/bin/env bash
# Pretrain a ViT-Tiny SARMAE encoder on the real SAR chips in ../shared/data, on a CPU, for at most
# MINUTES wall-clock minutes (default 45), with SARE on (SARE=off for the plain-MAE ablation).
#   MSTAR SOC-10 17-degree training split (2747 8-bit chips), OpenSARShip calibrated chips (1 band
#   used), the HRSID scenes (gray, random 128 px crops), random windows of the OPERA RTC rasters and
#   of the Sen1Floods11 scene (dB), and the flood chips: OMBRIA before/after (1248 8-bit VV chips) and
#   ETCI 2021 VV and VH tiles (396). No labels are read; FLOODS=off leaves the flood data out.
# Output: $OUT (default runs/pretrain_real_sare_<on|off>) with checkpoints, metrics.csv, loss_curves.png,
# reconstructions.png, and encoder / reconstruct packages made with `sarmae convert`.
# Usage: bash training/recipes/pretrain_real_chips_cpu.sh [extra section.key=value overrides]
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-../shared/data}
MINUTES=${MINUTES:-45}
EPOCHS=${EPOCHS:-25}  # the cosine schedule spans these; MINUTES stops earlier if needed
SARE=${SARE:-on}
FLOODS=${FLOODS:-on}
OUT=${OUT:-runs/pretrain_real_sare_${SARE}}
SARE_FLAG=$([ "$SARE" = on ] && echo true || echo false)
FLOOD_DATA=()
if [ "$FLOODS" = on ]; then
  FLOOD_DATA=("$DATA/ombria/OmbriaS1/train/BEFORE" "$DATA/ombria/OmbriaS1/train/AFTER"
              "$DATA"/etci2021/*/tiles/vv "$DATA"/etci2021/*/tiles/vh "$DATA/sen1floods11/*_S1Hand.tif")
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
.venv/bin/sarmae pretrain --config cpu_vit_tiny --output "$OUT" \
  --data "$DATA/mstar_soc10/train_17deg" "$DATA/opensarship/*/Patch_Cal" "$DATA/hrsid/P*[0-9].png" \
         "$DATA/opera_rtc_s1/one_burst_all_dates/*_VV.tif" "${FLOOD_DATA[@]}" \
  data.resize=crop data.windows_per_raster=8 sare.enabled=$SARE_FLAG \
  optim.epochs=${EPOCHS:-25} run.max_minutes=$MINUTES run.checkpoint_every_epochs=5 "$@"
.venv/bin/sarmae convert "$OUT/last.pt" --output "$OUT/encoder.pkg" --overwrite
.venv/bin/sarmae convert "$OUT/last.pt" --output "$OUT/mae.pkg" --task reconstruct --overwrite
echo "encoder package: $OUT/encoder.pkg"
