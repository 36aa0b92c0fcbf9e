"""
blip2lora/: the library behind the scripts at the top level (train.py, evaluate.py, caption.py, data.py, bench.py,
demo.py) and lora.py. Nothing here imports a script; each module's first line says its place.

    model.py, blip2.py          loading BLIP-2 and InstructBLIP; what they share (vision, Q-Former, image tokens)
    t5.py, opt.py, llama.py     the language-model families: the same functions, one file each (model.FAMILIES)
    decoder_only.py             what OPT and LLaMA share: the prefix once per image, in the loss and in generation
    vision_cache.py             the frozen ViT's outputs, computed once
    captioning.py, labels.py    captioning images with a base and an adapter; captions written as labels
    generation.py               beam search as transformers' generate(), the image side once per image
    adapter_files.py            adapters in the layout peft reads
    checkpoint.py, run_log.py   train.py's out_dir: checkpoints and resuming; the log, curves and model card
    layouts.py, images.py       the collection layouts data.py reads; reading one image
    scoring.py, curves.py       the captioning metrics and report.html
    settings.py, files.py       train.py's settings; safe file writes and one-line errors
    memory.py, progress.py      predicted GPU memory (bench.py --memory); progress bars
    model_card.py               the hub model card
"""
