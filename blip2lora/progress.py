"""
blip2lora/progress.py: progress bars and the time left.

Progress of the long loops (the vision-cache build, evaluations) and the time left, as a person reads it.

On a terminal: a tqdm bar with its ETA. Piped or logged (nohup, a cluster's log file, CI): a bar's carriage returns
would fill the file with half lines, so a plain line now and then instead ("captioning: 12/40 batches, 1m05s so
far, 2m50s left"), at most one every `every_s` seconds, so that short loops such as the demo's stay quiet.
"""
import sys
import time

from tqdm import tqdm


def duration(seconds):
    """3725 -> '1h02m', 125 -> '2m05s', 7 -> '7s'."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def print_to_stderr(line):
    print(line, file=sys.stderr, flush=True)


def progress(iterable, total, desc, unit, log=print_to_stderr, every_s=30.0, terminal=None, size=None):
    """Yield iterable's items, showing how far along: total `unit`s (a plural: "batches"), each item one of them or
    size(item) (a batch of images counted as its images: the rate is then images/s). The lines go where tqdm's bar
    would, to stderr, unless log says otherwise (train.py: its own log)."""
    terminal = sys.stderr.isatty() if terminal is None else terminal
    size = size or (lambda item: 1)
    if terminal:
        with tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True) as bar:
            for item in iterable:
                yield item
                bar.update(size(item))
        return
    start = last_line = time.time()
    done = 0
    for item in iterable:
        yield item  # the caller's work on it happens here
        done += size(item)
        now = time.time()
        if now - last_line >= every_s and done < total:
            left = (now - start) / done * (total - done)
            log(f"{desc}: {done}/{total} {unit}, {duration(now - start)} so far, {duration(left)} left")
            last_line = now
