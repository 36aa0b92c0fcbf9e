"""
Score captions the way captioning papers do: the COCO caption toolkit (pycocoevalcap) on a collection's test split.

    python evaluate.py                                   # the adapter in out/adapter, on the test split
    python evaluate.py --adapter out/demo/adapter        # the demo's adapter (its config names the base model)
    python evaluate.py --adapter none --model Salesforce/blip2-flan-t5-xl --data data/flickr8k   # zero-shot base
    python evaluate.py --predictions preds.json          # score captions made elsewhere: {"<image>": "<caption>"}
    python evaluate.py --out scores.json --html report.html
    python evaluate.py --adapter out/my_photos/adapter --data my_photos  # any layout data.py reads

The prompt and generation settings default to those the adapter was trained with (its caption_settings.json).

Every image is captioned with beam search (5 beams, 8 to 30 new tokens by default) and scored against all its
references: PTB tokenizer on both sides (lower-cases, strips punctuation), then BLEU-1..4, METEOR 1.5, ROUGE-L and
CIDEr-D, on the 0..1 scale (papers print x100). METEOR and the tokenizer run on Java; METEOR starts once per call.
"""
import argparse
import base64
import html
import io
import json
import os
import shutil
import sys
import warnings
from contextlib import contextmanager, redirect_stdout

import torch
from tqdm import tqdm

METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


class ScoringError(Exception):
    pass


@contextmanager
def _java_chatter_silenced():
    """The PTB tokenizer's Java process prints a progress line to our stderr on every call: drop it."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def require_java():
    """The COCO toolkit's tokenizer and METEOR run on Java: say so in one line, before any work is done."""
    if shutil.which("java") is None:
        raise ScoringError("java is not installed; the COCO toolkit's tokenizer and METEOR need it "
                           "(Debian/Ubuntu: apt-get install -y default-jre-headless)")


def score_captions(predictions, references, metrics=METRICS, spice=False, log=print, per_image=None):
    """predictions {image: caption}, references {image: [captions]} -> {metric: score}. The function train.py uses.
    per_image: a dict to fill with each image's CIDEr (the report orders images by it)."""
    require_java()
    if not predictions:
        raise ScoringError("no captions to score: none of the split's images could be captioned")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    names = sorted(predictions)
    tokenizer = PTBTokenizer()
    with _java_chatter_silenced():
        gts = tokenizer.tokenize({n: [{"caption": c} for c in references[n]] for n in names})
        res = tokenizer.tokenize({n: [{"caption": predictions[n]}] for n in names})
    scores = {}
    if any(m.startswith("Bleu") for m in metrics):
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        scores.update({f"Bleu_{i + 1}": b for i, b in enumerate(bleu) if f"Bleu_{i + 1}" in metrics})
    if "METEOR" in metrics:
        meteor = Meteor()  # one Java process (it loads a paraphrase table for ~10 s) for all images
        try:
            scores["METEOR"] = meteor.compute_score(gts, res)[0]
        finally:
            # Meteor.__del__ waits for the lock compute_score takes; if compute_score was cut short (Ctrl-C, Java
            # died) it still holds it, and the process would hang when the object is collected.
            if meteor.lock.locked():
                meteor.lock.release()
            meteor.meteor_p.kill()
            meteor.meteor_p.wait()
    if "ROUGE_L" in metrics:
        scores["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    if "CIDEr" in metrics:
        scores["CIDEr"], each = Cider().compute_score(gts, res)  # CIDEr-D, idf from these references
        if per_image is not None:
            per_image.update(zip(gts, map(float, each)))  # in the order of gts's keys
    if spice:
        try:
            from pycocoevalcap.spice.spice import Spice
            with redirect_stdout(io.StringIO()):  # its download attempt prints; our one line below says enough
                scores["SPICE"] = Spice().compute_score(gts, res)[0]
        except Exception as e:  # offline model download, Java > 8, ...: report the rest
            log(f"SPICE could not run ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                "reporting the other metrics")
    return {k: float(v) for k, v in scores.items()}


def warn_unreadable(item, error):
    warnings.warn(f"skipping unreadable image {item.path}: {error}")


@torch.no_grad()
def caption_stream(model, processor, items, prompt_ids, device, autocast, cache=None, batch_size=32, progress=False,
                   on_unreadable=warn_unreadable, **generate_kwargs):
    """Caption data.ImageCaptions items batch by batch, yielding (item, caption): the one captioning path of
    train.py, evaluate.py and caption.py. Vision outputs come from the cache when it has them; an image that cannot
    be read goes to on_unreadable(item, error) and the rest are still captioned."""
    from data import load_rgb
    from model import generate_captions, vision_embeds
    for start in tqdm(range(0, len(items), batch_size), desc="captioning", unit="batch", disable=not progress):
        chunk = items[start:start + batch_size]
        if cache is not None and cache.complete:
            chunk = [i for i in chunk if i.name not in cache.missing]
            with autocast:
                embeds = cache.lookup([i.name for i in chunk], device)
        else:
            images, kept = [], []
            for item in chunk:
                try:
                    images.append(load_rgb(item.path))
                    kept.append(item)
                except (OSError, ValueError) as e:
                    on_unreadable(item, e)
            chunk = kept
            if not chunk:
                continue
            pixels = processor.image_processor(images, return_tensors="pt").pixel_values.to(device)
            with autocast:
                embeds = vision_embeds(model, pixels)
        if not chunk:
            continue
        with autocast:
            texts = generate_captions(model, processor.tokenizer, prompt_ids, embeds, **generate_kwargs)
        yield from zip(chunk, texts)


def caption_items(*args, **kwargs):
    """caption_stream's captions as {image name: caption}."""
    return {item.name: text for item, text in caption_stream(*args, **kwargs)}


@torch.no_grad()
def captions_without_adapter(model, *args, **kwargs):
    """caption_items with every LoRA B set to 0, which is exactly the base model; B is put back afterwards."""
    from lora import lora_layers
    saved = [(layer, layer.lora_B.clone()) for _, layer in lora_layers(model)]
    for layer, _ in saved:
        layer.lora_B.zero_()
    try:
        return caption_items(model, *args, **kwargs)
    finally:
        for layer, lora_b in saved:
            layer.lora_B.copy_(lora_b)


def score_split(items, captions, label, zero_shot=None, spice=False, log=print):
    """Score a split's captions {image: caption} (and the zero-shot base's, if given): the step train.py's final
    evaluation and evaluate.py share. Returns (columns {label: metrics} for print_table and write_html, rows)."""
    references = {i.name: i.captions for i in items if i.name in captions}  # unreadable images were skipped
    per_image = {}
    columns = {label: score_captions(captions, references, spice=spice, log=log, per_image=per_image)}
    if zero_shot is not None:
        columns["zero-shot"] = score_captions(zero_shot, {n: references[n] for n in zero_shot}, spice=spice, log=log)
    rows = [{"image": i.name, "path": i.path, "caption": captions[i.name], "references": i.captions,
             "cider": per_image[i.name], "zero_shot": (zero_shot or {}).get(i.name)} for i in items
            if i.name in captions]
    return columns, rows


def print_table(columns):
    """columns: {"name": {metric: score}} -> a small aligned table, x100 as papers print it."""
    names = list(columns)
    print(f"{'metric':10s}" + "".join(f"{n:>14s}" for n in names))
    for metric in [m for m in METRICS + ("SPICE",) if any(m in c for c in columns.values())]:
        print(f"{metric:10s}" + "".join(f"{100 * columns[n][metric]:14.1f}" if metric in columns[n]
                                        else f"{'-':>14s}" for n in names))


def thumbnail(path):
    """An <img> with the image embedded as a small JPEG, so the page is one self-contained file."""
    from PIL import Image
    from data import load_rgb
    try:
        image = load_rgb(path)
    except (OSError, ValueError):
        return "(unreadable)"
    image.thumbnail((160, 160), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return f"<img src='data:image/jpeg;base64,{base64.b64encode(buffer.getvalue()).decode()}'>"


def write_html(path, title, columns, rows):
    """One self-contained page for finding failures: the scores (columns {label: metrics}), then every image with its
    captions and references, the lowest CIDEr first. rows: {image, path, caption, references, cider, zero_shot?}."""
    labels = list(columns)
    metrics = [m for m in METRICS + ("SPICE",) if any(m in c for c in columns.values())]
    esc = html.escape
    parts = [f"<!doctype html><meta charset='utf-8'><title>{esc(title)}</title><style>"
             "body{font-family:sans-serif;max-width:1100px;margin:auto;padding:0 1em}table{border-collapse:collapse}"
             "th,td{vertical-align:top;padding:4px 8px;text-align:left}.scores td{text-align:right}"
             ".images tr{border-top:1px solid #ddd}img{max-width:160px}.gen{font-weight:bold}.zs{color:#666}"
             ".low{color:#b00}</style>", f"<h1>{esc(title)}</h1>",
             "<p>Scores x100 (the 0..1 scores of the COCO caption toolkit, as papers print them).</p>",
             "<table class='scores'><tr><th>metric</th>" + "".join(f"<th>{esc(n)}</th>" for n in labels) + "</tr>"]
    parts += [f"<tr><th>{m}</th>" + "".join(f"<td>{100 * columns[n][m]:.1f}</td>" if m in columns[n] else "<td>-</td>"
                                           for n in labels) + "</tr>" for m in metrics]
    parts.append(f"</table><h2>{len(rows)} images, lowest CIDEr first</h2><table class='images'>"
                 "<tr><th>image</th><th>CIDEr x100</th><th>captions</th><th>references</th></tr>")
    for row in sorted(rows, key=lambda r: r["cider"]):
        captions = f"<div class='gen'>{esc(labels[0])}: {esc(row['caption'])}</div>"
        if row.get("zero_shot") is not None:
            captions += f"<div class='zs'>zero-shot: {esc(row['zero_shot'])}</div>"
        references = "".join(f"<li>{esc(r)}</li>" for r in row["references"])
        parts.append(f"<tr><td>{thumbnail(row['path'])}</td><td class='{'low' if row['cider'] < 0.1 else ''}'>"
                     f"{100 * row['cider']:.1f}</td><td><div>{esc(row['image'])}</div>{captions}</td>"
                     f"<td><ul>{references}</ul></td></tr>")
    parts.append("</table>")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    os.replace(tmp, path)


def main(argv=None):
    from caption import add_generation_arguments
    parser = argparse.ArgumentParser(description="COCO-toolkit scores for a BLIP-2 adapter on a caption collection.")
    parser.add_argument("--adapter", help="adapter directory, or 'none' for the zero-shot base (default: out/adapter)")
    parser.add_argument("--model", help="base model hub id or directory (default: the adapter's base model)")
    parser.add_argument("--data", "--data_dir", help="caption collection directory, any layout data.py reads "
                        "(default: data/flickr8k, or the demo's for a demo model)")
    parser.add_argument("--caption-column", "--caption_column", help="imagefolder metadata: the caption column")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--predictions", help="score this JSON {image: caption} instead of generating")
    add_generation_arguments(parser, batch_size=32)
    parser.add_argument("--spice", action="store_true", help="also try SPICE (needs Java 8 and a download)")
    parser.add_argument("--out", help="write metrics, settings and every caption as JSON")
    parser.add_argument("--html", help="write a self-contained HTML page: scores, then every image with its "
                        "captions and references, the lowest CIDEr first")
    parser.add_argument("--zero-shot-too", "--zero_shot_too", action=argparse.BooleanOptionalAction,
                        help="with an adapter: also caption with the zero-shot base and show both, a second "
                        "captioning pass (default: on with --html, off otherwise)")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except Exception as e:
        from data import DataError
        from model import ModelError
        if isinstance(e, (DataError, ModelError, ScoringError, ValueError)):
            print(f"error: {e}", file=sys.stderr)
            return 1
        raise


def run(args):
    from caption import resolve_generation, resolve_model
    from data import encoder_prompt_ids, read_captions
    from model import autocast_context, autocast_dtype
    import demo
    notes = []
    for path in filter(None, (args.out, args.html)):  # now, not after the captioning
        if os.path.isdir(path):
            raise ScoringError(f"{path}: is a directory; give a file name, e.g. {os.path.join(path, 'scores.json')}")
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        except OSError as e:
            raise ScoringError(f"{path}: cannot create its directory ({e.strerror})") from None
    adapter, model_name = resolve_model(args.adapter, args.model, log=notes.append)  # said if no error follows
    resolve_generation(args, adapter)
    is_demo = os.path.normpath(model_name) == demo.DEMO_MODEL
    data_dir = args.data or (demo.DEMO_DATA if is_demo else "data/flickr8k")
    demo.ensure_demo_world(data_dir)
    collection = read_captions(data_dir, args.caption_column)
    items = collection.splits[args.split]
    if not items:
        raise ScoringError(f"{data_dir}: the {args.split} split has no images (split: {collection.split_source}); "
                           "python data.py DIR shows the splits")
    references = {i.name: i.captions for i in items}
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "html")}
    settings.update(adapter=adapter, model=model_name, data=data_dir)
    zero_shot = None
    if args.predictions:
        try:
            predictions = json.loads(open(args.predictions, "rb").read().decode("utf-8"))
        except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
            raise ScoringError(f"{args.predictions}: cannot read predictions ({e})") from None
        if not isinstance(predictions, dict) or not all(isinstance(v, str) for v in predictions.values()):
            raise ScoringError(f"{args.predictions}: expected a JSON object {{\"<image file name>\": \"<caption>\"}}")
        unknown = sorted(set(predictions) - set(references))
        missing = sorted(set(references) - set(predictions))
        if unknown:
            raise ScoringError(f"{args.predictions}: {unknown[0]!r} is not an image of the {args.split} split "
                               f"({len(unknown)} such names)")
        if missing:
            raise ScoringError(f"{args.predictions}: no caption for {missing[0]!r} of the {args.split} split "
                               f"({len(missing)} of {len(references)} images missing)")
    else:
        from caption import load_for_captioning
        model, processor = load_for_captioning(model_name, adapter, args.device)
        print("\n".join(notes), file=sys.stderr)
        prompt_ids = encoder_prompt_ids(processor.tokenizer, args.prompt, model.config.num_query_tokens,
                                        model.config.image_token_id)
        generation = dict(batch_size=args.batch_size, progress=True, num_beams=args.num_beams,
                          max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens)
        autocast = autocast_context(args.device, autocast_dtype(args.device))
        predictions = caption_items(model, processor, items, prompt_ids, args.device, autocast, **generation)
        if adapter is not None and (args.zero_shot_too if args.zero_shot_too is not None else bool(args.html)):
            zero_shot = captions_without_adapter(model, processor, items, prompt_ids, args.device, autocast,
                                                 **generation)
    columns, rows = score_split(items, predictions, "zero-shot" if adapter is None else "fine-tuned", zero_shot,
                                spice=args.spice, log=lambda message: print(message, file=sys.stderr))
    label = next(iter(columns))
    print(f"{args.split} split, {len(predictions)} images, " + (f"adapter {adapter}" if adapter else "zero-shot"))
    print_table(columns)
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"metrics": columns[label], "settings": settings, "captions": [
                {k: r[k] for k in ("image", "caption", "cider", "references")} for r in rows]}, f, indent=1)
        os.replace(tmp, args.out)
        print(f"scores and captions: {args.out}")
    if args.html:
        write_html(args.html, f"BLIP-2 captions, {data_dir} {args.split} split", columns, rows)
        print(f"report: {args.html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
