"""The offline demo with the frozen language model in 4 bits (NF4 through bitsandbytes, as QLoRA), on the CPU too:
python train.py config/demo_4bit.py (its time and scores: README "Which GPU"). Twice the steps of
config/demo.py at half its learning rate: the tiny base rounded to NF4 needs them to end near the 16-bit demo's
scores on any pretrained copy of the base (README "Which GPU")."""
model = "data/demo/blip2-tiny"
data_dir = "data/demo/flickr8k"
out_dir = "out/demo4"
base_bits = 4
gradient_checkpointing = True
batch_images = 8            # 200 train images -> 25 steps an epoch
epochs = 8
learning_rate = 5e-3
warmup_steps = 10
lora_dropout = 0.0
eval_interval = 50
eval_images = 0             # all 50 val images
checkpoint_interval = 25
num_workers = 0
log_interval = 10
