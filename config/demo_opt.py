"""The offline demo with an OPT language model, as Salesforce/blip2-opt-2.7b has: python train.py config/demo_opt.py
(builds data/demo/blip2-opt-tiny on first use)."""
model = "data/demo/blip2-opt-tiny"
data_dir = "data/demo/flickr8k"
out_dir = "out/demo_opt"
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
