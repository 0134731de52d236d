#!/usr/bin/env bash
# GPU smoke test: a few steps of every training path on CUDA and the evaluation on the GPU, one PASS/FAIL
# line per item. CI has no GPU; run this whenever a machine with one is available and record the output in
# the README ("GPU smoke test"). Needs no network: the data are drawn here.
#
#   bash benchmarks/gpu_smoke.sh [OUT_DIR]          # exit status = number of failed items
#   GPU_SMOKE_ALLOW_CPU=1 bash benchmarks/gpu_smoke.sh   # the same items on the CPU (checks this script;
#                                                      # FSDP is skipped there: Accelerate shards on GPUs only)
#   GPU_SMOKE_ONLY=recipe_ bash benchmarks/gpu_smoke.sh  # only the items whose name matches (grep -E)
set -u
cd "$(dirname "$0")/.."
out="${1:-${OUT:-$(mktemp -d)}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

cpu=0
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    if [ "${GPU_SMOKE_ALLOW_CPU:-0}" != "1" ]; then
        echo "FAIL cuda: torch sees no CUDA device ($(python -c 'import torch; print(torch.__version__)'))"
        exit 1
    fi
    cpu=1
    echo "SKIP cuda: no CUDA device, running the items on the CPU (GPU_SMOKE_ALLOW_CPU=1)"
else
    python -c "import torch; print('device:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
fi

# Ten classes of coloured shapes on noise, 48 px (larger than the model: crops come from the original).
data="$out/data"
python - "$data" <<'EOF'
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

root = Path(sys.argv[1])
rng = np.random.default_rng(0)
palette = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 190)]
for split, count in (("train", 64), ("val", 16)):
    for label, colour in enumerate(palette):
        folder = root / split / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            image = Image.fromarray(rng.integers(0, 80, (48, 48, 3), dtype=np.uint8))
            left, top = rng.integers(0, 24, 2)
            size = int(rng.integers(12, 24))
            ImageDraw.Draw(image).ellipse((left, top, left + size, top + size), fill=colour)
            image.save(folder / f"{split}_{index:03d}.png")
EOF

failures=0
item() {  # item NAME COMMAND...: run the command, print PASS/FAIL, keep its log
    local name="$1"
    shift
    echo "$name" | grep -qE "${GPU_SMOKE_ONLY:-.}" || return 0
    local started=$SECONDS
    if bash -c "$*" >"$out/$name.log" 2>&1; then
        echo "PASS $name ($((SECONDS - started)) s)"
    else
        echo "FAIL $name ($((SECONDS - started)) s): $(grep -E 'Error|error' "$out/$name.log" | tail -1)"
        failures=$((failures + 1))
    fi
}
run_is() {  # run_is DIR KEY VALUE: a command checking that results.json's "run" has KEY == VALUE
    echo "python -c 'import json, sys; run = json.load(open(sys.argv[1]))[\"run\"]; print(run); \
sys.exit(str(run[sys.argv[2]]).lower() != sys.argv[3].lower())' $1/results.json $2 $3"
}

launch="python -m accelerate.commands.launch --num_machines 1 --dynamo_backend no"
single="$launch --num_processes 1 --mixed_precision bf16"
fsdp="$launch --config_file training_scripts/configs/fsdp.yaml --num_processes 1"
backend=inductor
[ "$cpu" = 1 ] && backend=aot_eager  # inductor's CPU compile takes minutes; this checks the path
workers=4
[ "$cpu" = 1 ] && workers=1
data_flags="--train_dir $data/train --validation_dir $data/val --dataloader_num_workers $workers"
mae="training_scripts/train_mae.py $data_flags --image_size 32 --patch_size 4 --max_train_steps 12"
mae="$mae --per_device_train_batch_size 32 --knn_train_samples 320 --knn_eval_samples 160 --logging_steps 2"
dit="training_scripts/train_diffusion.py $data_flags --model dit --objective flow --image_size 32"
dit="$dit --patch_size 4 --num_layers 4 --max_train_steps 12 --per_device_train_batch_size 32"
dit="$dit --num_samples 4 --num_inference_steps 4 --sample_every 1"
unet="training_scripts/train_diffusion.py $data_flags --model unet --image_size 32 --max_train_steps 12"
unet="$unet --per_device_train_batch_size 32 --num_samples 4 --num_inference_steps 4 --sample_every 0"
tiny_mae="--hidden_size 32 --num_hidden_layers 2 --num_attention_heads 2 --intermediate_size 64"
tiny_mae="$tiny_mae --decoder_hidden_size 16 --decoder_num_hidden_layers 1 --decoder_num_attention_heads 2"
tiny_mae="$tiny_mae --decoder_intermediate_size 32"
tiny_dit="--num_attention_heads 2 --attention_head_dim 8"
if [ "$cpu" = 1 ]; then  # tiny models: the CPU run checks the paths, not the speed
    mae="$mae $tiny_mae"
    dit="$dit $tiny_dit"
    unet="$unet --block_out_channels 8,16"
fi

item mae_bf16 "$single $mae --output_dir $out/mae_bf16 && $(run_is "$out/mae_bf16" mixed_precision bf16)"
item mae_compile "$single $mae --torch_compile --torch_compile_backend $backend --output_dir $out/mae_compile \
    && $(run_is "$out/mae_compile" torch_compile $backend)"
item mae_accumulate_checkpointing "$single $mae --gradient_accumulation_steps 2 --gradient_checkpointing \
    --output_dir $out/mae_ckpt && $(run_is "$out/mae_ckpt" gradient_checkpointing true)"
item mae_resume "$single $mae --checkpointing_steps 6 --max_train_steps 6 --output_dir $out/mae_resume \
    && $single $mae --checkpointing_steps 6 --output_dir $out/mae_resume --resume_from_checkpoint latest \
    && $(run_is "$out/mae_resume" mixed_precision bf16)"
item dit_bf16_ema "$single $dit --output_dir $out/dit && $(run_is "$out/dit" mixed_precision bf16)"
item unet_bf16_ema "$single $unet --output_dir $out/unet && $(run_is "$out/unet" mixed_precision bf16)"
if [ "$cpu" = 1 ]; then
    echo "SKIP mae_fsdp, dit_fsdp: FSDP needs CUDA"
else
    item mae_fsdp "$fsdp $mae --output_dir $out/mae_fsdp && $(run_is "$out/mae_fsdp" distributed_type fsdp)"
    item dit_fsdp "$fsdp $dit --output_dir $out/dit_fsdp && $(run_is "$out/dit_fsdp" distributed_type fsdp)"
fi
# Every recipe in training_scripts/recipes/ for 3 steps, so each is known to start: on a GPU with the paper's
# model sizes and precision, on the CPU with tiny models in fp32. There is no network here: the drawn images
# (as --dataset_name, which the recipes set) stand in for ImageNet at 32 px, and a tiny random AutoencoderKL
# for stabilityai/sd-vae-ft-ema.
vae="$out/tiny_vae"
python - "$vae" <<'EOF'
import sys

from diffusers import AutoencoderKL

AutoencoderKL(
    block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=32,
).save_pretrained(sys.argv[1])
EOF
shrink="--dataset_name $data --dataloader_num_workers $workers --image_size 32 --max_train_steps 3"
shrink="$shrink --per_device_train_batch_size 8"
shrink="$shrink --gradient_accumulation_steps 1 --logging_steps 1"
for recipe in training_scripts/recipes/*.yaml; do
    name=$(basename "$recipe" .yaml)
    case "$name" in
        mae_*)
            flags="training_scripts/train_mae.py --recipe $recipe $shrink --knn_train_samples 64"
            flags="$flags --knn_eval_samples 32"
            [ "$cpu" = 1 ] && flags="$flags --patch_size 4 $tiny_mae" ;;
        *)
            flags="training_scripts/train_diffusion.py --recipe $recipe $shrink --num_samples 4"
            flags="$flags --num_inference_steps 2 --sample_every 0"
            if grep -q '^vae:' "$recipe"; then flags="$flags --vae $vae"; fi
            [ "$cpu" = 1 ] && flags="$flags $tiny_dit" ;;
    esac
    [ "$cpu" = 1 ] && flags="$flags --mixed_precision no"
    item "recipe_$name" "$launch --num_processes 1 $flags --output_dir $out/recipe_$name"
done
item eval_on_device "python - '$out/mae_bf16' '$data' <<'EOF'
import sys

import torch
from transformers import AutoImageProcessor

import hf_resdecay
from hf_resdecay.data import load_image_dataset
from hf_resdecay.evaluation import extract_features, knn_accuracy

folder, data = sys.argv[1], sys.argv[2]
device = 'cuda' if torch.cuda.is_available() else 'cpu'
model = hf_resdecay.ViTMAEDecayModel.from_pretrained(folder).eval()
processor = AutoImageProcessor.from_pretrained(folder)
train = load_image_dataset(data + '/train', split='train')
val = load_image_dataset(data + '/val', split='train')
options = dict(image_processor=processor, cache=False, progress=False)
cpu_val = extract_features(model, val, **options)
model.to(device)
on_device = [extract_features(model, split, **options) for split in (train, val)]
difference = (torch.as_tensor(on_device[1].last()) - torch.as_tensor(cpu_val.last())).abs().max().item()
top1 = knn_accuracy(on_device[0].last(), on_device[0].labels, on_device[1].last(), on_device[1].labels)['top1']
print(f'{device}: kNN top-1 {top1:.2f}%, max |features {device} - cpu| = {difference:.2e}')
assert difference < 1e-3, difference
EOF"

echo "$failures failed"
exit "$failures"
