"""
blip2lora/model_card.py: the model card beside an adapter or a merged export.

The model card beside a trained adapter (out_dir/adapter/README.md) or a merged export: the README a Hugging Face
model repository shows, so that `hf upload your-name/your-adapter out/adapter` publishes something people can find
and use. Hub metadata first (YAML front matter: base_model, library_name, pipeline_tag, tags, and the test scores as
model-index; the license is the user's to add), then what it is, what it was trained on and with, its scores, and
how to use it. train.py writes it with each adapter it keeps and again once the test scores are in; caption.py
--export-merged writes one for the merged model. peft and transformers ignore the file.
"""
import os
import re

import yaml  # PyYAML comes with transformers

from blip2lora.files import atomic_write
from blip2lora.model import KINDS  # what the card calls each kind of model, and its snippets' classes

CARD_FILE = "README.md"
METRICS = ("Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
LOAD_IMAGE = """from PIL import Image, ImageOps


def load_image(path):  # as caption.py reads images: EXIF orientation applied, transparency on white
    image = ImageOps.exif_transpose(Image.open(path)).convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", image.size, "white"), image).convert("RGB")

"""  # the README's snippet too (tests/test_evaluate.py: the same pixels as images.load_image)


def write_card(folder, parts):
    atomic_write(os.path.join(folder, CARD_FILE), re.sub(r"\n{3,}", "\n\n", "\n".join(parts)))


def front_matter(meta):
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def model_index(name, collection, scores, images):
    """The hub's evaluation results: the fine-tuned scores on the collection's test split (x100)."""
    metrics = [{"type": metric.lower(), "name": f"{metric} (x100)", "value": round(value, 2)}
               for metric, value in scores.items() if metric in METRICS]
    return [{"name": name, "results": [{"task": {"type": "image-to-text", "name": "Image captioning"},
                                        "dataset": {"name": f"{collection} ({images} test images)",
                                                    "type": collection, "split": "test"},
                                        "metrics": metrics}]}]


def score_table(scores):
    """scores {"zero-shot": {metric: x100}, "fine-tuned": {...}} as a Markdown table."""
    labels = list(scores)
    rows = [m for m in METRICS if any(m in s for s in scores.values())]
    return "\n".join([f"| metric | {' | '.join(labels)} |", "| --- |" + " ---: |" * len(labels)]
                     + [f"| {m} | " + " | ".join(f"{scores[n][m]:.1f}" if m in scores[n] else "-" for n in labels)
                        + " |" for m in rows])


def collection_name(data_dir):
    """The collection as a card names it: its folder's name as a slug (letters, digits, . _ -), which no folder name
    can turn into Markdown, HTML or another line of YAML."""
    return _slug(os.path.basename(os.path.abspath(str(data_dir)))) or "captions"


def _slug(name):
    """letters, digits, . _ and -, every other run of characters one -; "" if nothing is left."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")


def base_reference(base_model):
    """The base as a published card names it: its hub id, or a local folder's name (never its path on this disk),
    with a line saying to put the hub id there."""
    if not os.path.isdir(base_model):
        return base_model, ""
    name = _slug(os.path.basename(os.path.normpath(base_model))) or "base"
    return name, (f"\n`base_model` names the local folder it was trained from ({name}); put the base's hub id there "
                  "before uploading, so that the hub links the two.\n")


def base_license(base_model):
    """The license the base's own card gives (its README.md's front matter, in its folder or the local hub cache), or
    None."""
    path = os.path.join(base_model, CARD_FILE)
    if not os.path.isdir(base_model):
        from huggingface_hub import try_to_load_from_cache
        path = try_to_load_from_cache(base_model, CARD_FILE)
    try:
        text = open(path, encoding="utf-8").read() if isinstance(path, str) else ""
        meta = yaml.safe_load(text.split("---")[1]) if text.startswith("---") else None
    except (OSError, UnicodeDecodeError, IndexError, yaml.YAMLError):
        return None
    license_id = meta.get("license") if isinstance(meta, dict) else None
    return license_id if isinstance(license_id, str) else None


def publishing(base_model):
    """(front matter's base_model and license, the card's lines saying what to set before uploading)."""
    base, note = base_reference(base_model)
    license_id = base_license(base_model)
    if license_id is None:
        note += ("\n`license: unknown`: the base's card gave none here; set the base model's license (and your "
                 "data's terms) before uploading.\n")
    return {"base_model": base, "license": license_id or "unknown"}, note


def adapter_card(folder, facts):
    """Write folder/README.md for a LoRA adapter. facts: base_model, targets, r, alpha, dropout, collection,
    layout, splits {split: (images, captions)}, settings {name: value}, step, total_steps, prompt, generation
    {name: value}, and once measured scores {"zero-shot": ..., "fine-tuned": ...} with test_images."""
    about = facts.get("collection_about")  # (name, description) for a collection its folder name misnames
    collection, scores = about[0] if about else collection_name(facts["collection"]), facts.get("scores")
    name, kind = f"blip2-lora-{collection}", facts.get("model_type", "blip-2")
    published, note = publishing(facts["base_model"])
    meta = {**published, "library_name": "peft", "pipeline_tag": "image-to-text",
            "tags": [kind, "lora", "image-captioning", collection]}
    if scores:
        meta["model-index"] = model_index(name, collection, scores["fine-tuned"], facts["test_images"])
    splits = ", ".join(f"{split} {images} images / {captions} captions"
                       for split, (images, captions) in facts["splits"].items())
    settings = "\n".join(f"| {k} | {v} |" for k, v in facts["settings"].items())
    modules = ", ".join(f"`{t}`" for t in facts["targets"])
    data = about[1] if about else f"`{collection}` ({facts['layout']})"
    text = [front_matter(meta), f"# {name}: {KINDS[kind][0]} LoRA adapter for captioning images like `{collection}`\n",
            f"LoRA (rank r={facts['r']}, alpha={facts['alpha']:g}, so updates scaled by "
            f"{facts['alpha'] / facts['r']:g}; dropout {facts['dropout']:g}) on the modules {modules} of "
            f"{KINDS[kind][0]}'s Q-Former and language model, everything else frozen; only the adapter's weights are "
            "here (peft's layout). Trained with blip2-lora-captioning's `train.py`.", note,
            "\n## Training data\n", f"{data}: {splits}.\n",
            "\n## Training\n", f"Kept: the adapter of step {facts['step']} of {facts['total_steps']} "
            f"({facts['epochs_trained']:.3g} epochs over the train split).\n",
            "| setting | value |\n| --- | --- |\n" + settings + "\n",
            "\n## Test scores (x100, the COCO caption toolkit's scores as papers print them)\n"]
    text.append(f"{facts['test_images']} test images, beam search as below.\n\n" + score_table(scores) + "\n" if scores
                else "Not measured yet: train.py's final evaluation writes them here.\n")
    text.append(usage(facts["prompt"], facts["generation"], published["base_model"], kind))
    write_card(folder, text)


def prompt_sentence(prompt, kind):
    if kind == "instructblip":
        return f"Every caption answers the instruction {prompt!r}, which the Q-Former and the language model both read"
    return f"Every caption starts from the prompt {prompt!r} (BLIP-2 continues it)"


def usage(prompt, generation, base_model, kind="blip-2"):
    settings = ", ".join(f"{k}={v}" for k, v in generation.items())
    _, model_class, processor_class = KINDS[kind]
    return f"""
## Use it

{prompt_sentence(prompt, kind)}, with {settings}.

With blip2-lora-captioning:

```bash
python caption.py --adapter path/to/this/folder photo.jpg
```

With peft and transformers:

```python
from peft import PeftModel
from transformers import {model_class}, {processor_class}
{LOAD_IMAGE}
base = {base_model!r}
model = PeftModel.from_pretrained({model_class}.from_pretrained(base), "path/to/this/folder")
processor = {processor_class}.from_pretrained(base)
inputs = processor(images=[load_image("photo.jpg")], text=[{prompt!r}], return_tensors="pt")
ids = model.generate(**inputs, {settings})
print(processor.batch_decode(ids, skip_special_tokens=True))
```

A decoder-only base (OPT, Vicuna) returns the prompt's tokens before the caption: decode
`ids[:, inputs.input_ids.shape[1]:]`.

Publish it: `hf upload your-name/your-adapter path/to/this/folder` (huggingface_hub's command line).
"""


def merged_card(folder, base_model, adapter, trained_on, prompt, generation, scores=None, test_images=0,
                kind="blip-2"):
    """Write folder/README.md for a merged export: a plain transformers BLIP-2 (or InstructBLIP) checkpoint."""
    collection = collection_name(trained_on.get("data_dir", "captions"))
    name, (title, model_class, processor_class) = f"blip2-lora-{collection}-merged", KINDS[kind]
    published, note = publishing(base_model)
    meta = {**published, "library_name": "transformers", "pipeline_tag": "image-to-text",
            "tags": [kind, "lora", "merged", "image-captioning", collection]}
    if scores:
        meta["model-index"] = model_index(name, collection, scores["fine-tuned"], test_images)
    settings = ", ".join(f"{k}={v}" for k, v in generation.items())
    text = [front_matter(meta), f"# {name}: {title} fine-tuned for image captioning\n",
            f"{published['base_model']} with a LoRA adapter (trained on `{collection}`, step "
            f"{trained_on.get('step', '?')}) folded into its weights by blip2-lora-captioning's `caption.py "
            "--export-merged`: a plain transformers checkpoint, no peft needed.", note]
    if scores:
        text.append(f"\n## Test scores (x100), {test_images} images\n\n" + score_table(scores) + "\n")
    text.append(f"""
## Use it

{prompt_sentence(prompt, kind)}. The prompt and the generation settings ({settings}) are in
`caption_settings.json` and `generation_config.json`:

```python
from transformers import {model_class}, {processor_class}
{LOAD_IMAGE}
model = {model_class}.from_pretrained("path/to/this/folder")
processor = {processor_class}.from_pretrained("path/to/this/folder")
inputs = processor(images=[load_image("photo.jpg")], text=[{prompt!r}], return_tensors="pt")
ids = model.generate(**inputs, generation_config=model.generation_config)
print(processor.batch_decode(ids, skip_special_tokens=True))
```
""")
    write_card(folder, text)
