"""The offline demo: python train.py config/demo.py (builds data/demo/ on first use; its time and scores: README
"Quick start")."""
model = "data/demo/blip2-tiny"
data_dir = "data/demo/flickr8k"
out_dir = "out/demo"
batch_images = 8            # 200 train images -> 25 steps an epoch
epochs = 4
learning_rate = 1e-2        # a tiny model and rank-8 adapters take a large step size
warmup_steps = 10
lora_dropout = 0.0
eval_interval = 50
eval_images = 0             # all 50 val images
checkpoint_interval = 25
num_workers = 0
log_interval = 10
