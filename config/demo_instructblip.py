"""The offline demo with InstructBLIP, its Q-Former reading the instruction and a LLaMA language model, as
Salesforce/instructblip-vicuna-7b has: python train.py config/demo_instructblip.py (builds data/demo/instructblip-tiny
on first use; its time and scores: README "InstructBLIP")."""
model = "data/demo/instructblip-tiny"
data_dir = "data/demo/flickr8k"
out_dir = "out/demo_instructblip"
prompt = "A short image description:"  # the instruction, read by the Q-Former and the language model
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
