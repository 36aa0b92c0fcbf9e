"""
blip2lora/model.py: loading BLIP-2 and the family that knows its language model (t5.py, opt.py, llama.py).

BLIP-2 (and InstructBLIP) as train.py, evaluate.py, caption.py and bench.py use it, whichever language model it has:
loading (16-bit, or a 4/8-bit language model through bitsandbytes) with a clear line for each problem, the family
that knows the language model (t5.py for Flan-T5, opt.py for OPT, llama.py for Vicuna), the loss, the memory levers
and caption generation.

    lm = family(model.config)                  # t5, opt or llama: FAMILIES[config.text_config.model_type]
    loss_sum, tokens = grouped_caption_loss(model, batch, image_embeds)     # = lm.grouped_caption_loss(...)

The shared parts (vision, Q-Former, image tokens) are in blip2.py, the frozen-vision cache in vision_cache.py.
"""
import functools
import logging
import os

import torch

from blip2lora import llama, opt, t5
from blip2lora.blip2 import QFORMER_TARGETS, cast_frozen_qformer, embed_prompt, image_features, train_mode
from blip2lora.files import UserError, first_line
from blip2lora.generation import generate_ids
from lora import inject_lora

DEFAULT_MODEL = "Salesforce/blip2-flan-t5-xl"
# The language-model families: text_config.model_type -> the module that knows it. Each defines the same public
# names, FAMILY_CONTRACT (tests/test_layout.py holds them to it); its helpers are private (_name). The rest of the
# project asks the family (family(config).grouped_caption_loss, ...) and never branches on which one it is.
FAMILIES = {"t5": t5, "opt": opt, "llama": llama}
FAMILY_CONTRACT = (
    "LORA_TARGETS",               # module-path suffixes of the language model's attention, where LoRA goes
    "KEEP_UNQUANTIZED",           # what a 4/8-bit base keeps 16-bit besides BLIP-2's own parts
    "SIZES",                      # the released language models' dimensions, and the small and tiny stand-ins
    "VOCAB_SIZE", "IMAGE_TOKEN_ID",  # the released checkpoints' vocabulary size and <image> token
    "SPECIAL_TOKENS",             # how its tokenizer lays out special tokens (demo.build_processor)
    "text_config",                # (size) -> the language model's config at one of SIZES
    "caption_ids",                # (tokenizer, captions, eos_token_id) -> each caption's ids as the model learns them
    "per_pair_caption_loss",      # (model, batch) -> (summed loss, tokens), one forward per image-caption pair
    "grouped_caption_loss",       # (model, batch, image_embeds) -> the same, what depends on the image once per image
    "prepare",                    # (model, compute_dtype) -> a note for the user; done once after loading
    "use_gradient_checkpointing",  # (model): the language model's layers recompute their activations
    "as_released",                # (model): a model built from a config holds its weights as the checkpoint does
    "start_generation",           # (model, input_ids, image_embeds, beams, max_new_tokens) -> (state, first logits)
    "decode_step",                # (model, state, tokens, n) -> the next token's logits, one new token per row
    "new_tokens",                 # (output, input_ids) -> the new tokens of a BLIP-2 model.generate() output
    "prepare_export",             # (model): what a merged export's own generate() needs
)
# The models this project fine-tunes, by config.model_type: their name, and their transformers model and processor
# classes. InstructBLIP is BLIP-2 whose Q-Former also reads the instruction (blip2.image_features); the language
# model is a family's either way.
KINDS = {"blip-2": ("BLIP-2", "Blip2ForConditionalGeneration", "Blip2Processor"),
         "instructblip": ("InstructBLIP", "InstructBlipForConditionalGeneration", "InstructBlipProcessor")}


# BLIP-2's parts a 4/8-bit base keeps 16-bit: bitsandbytes would otherwise also quantize the ViT and the projection
# (bitsandbytes 0.50, transformers 5.24). The family adds its own (t5.KEEP_UNQUANTIZED).
KEEP_UNQUANTIZED = ("vision_model", "qformer", "language_projection", "lm_head")


class ModelError(UserError):
    """A model or adapter that cannot be loaded, reported in one line without a traceback."""


def family(config):
    """The module that knows this BLIP-2's language model (check_supported has refused any other)."""
    return FAMILIES[config.text_config.model_type]


def lora_targets(config):
    """The default LoRA targets: the Q-Former's attention, and the language model's (t5.LORA_TARGETS or
    opt.LORA_TARGETS)."""
    return [*QFORMER_TARGETS, *family(config).LORA_TARGETS]


def grouped_caption_loss(model, batch, image_embeds):
    """train.py's loss: the image side once per image, the rest as the family shares it (t5.py, ...)."""
    return family(model.config).grouped_caption_loss(model, batch, image_embeds)


def per_pair_caption_loss(model, batch):
    """The plain loss, one whole forward per (image, caption) pair: bench.py's comparison and the tests' reference."""
    return family(model.config).per_pair_caption_loss(model, batch)


def caption_tokenizer(tokenizer, config):
    """captions -> token ids, each ending in the family's end token, as the language model learns them."""
    return functools.partial(family(config).caption_ids, tokenizer, eos_token_id=config.text_config.eos_token_id)


def use_gradient_checkpointing(model):
    family(model.config).use_gradient_checkpointing(model)


def prepare(model, compute_dtype):
    """What the step needs once the model is loaded, for the dtype its matmuls run in: the frozen Q-Former cast once to
    bf16 under bf16 autocast (blip2.cast_frozen_qformer), and the family's own (t5.prepare: T5's `wo` in float32 under
    float16, where Flan-T5's activations overflow). train.py, caption.py and evaluate.py all come here. Returns the
    family's note for the user ("" if none)."""
    cast_frozen_qformer(model, compute_dtype)
    return family(model.config).prepare(model, compute_dtype)


def prepare_for_training(model, compute_dtype, settings, gradient_checkpointing=False):
    """The model as train.py's step takes it, once loaded (a 4/8-bit base is quantized as it loads, load_blip2;
    memory.py emulates that before coming here): prepare for the dtype the matmuls run in, LoRA with train.py's
    settings (lora_targets, the family's when empty; lora_r, lora_alpha, lora_dropout), gradient checkpointing if
    asked, and train mode for the adapters only. train.py, bench.py and memory.py all come here. Returns prepare's note
    for the user; a target that matches nothing, or matches inside the frozen ViT, is a ValueError."""
    note = prepare(model, compute_dtype)
    targets = settings["lora_targets"] or lora_targets(model.config)
    wrapped = inject_lora(model, targets, settings["lora_r"], settings["lora_alpha"], settings["lora_dropout"])
    inside_vit = sorted({t for t in targets for path in wrapped
                         if path.startswith("vision_model.") and (path == t or path.endswith("." + t))})
    if inside_vit:
        raise ValueError(f"{inside_vit[0]!r} matches layers inside the ViT (vision_model...), which this project keeps "
                         "frozen so that its outputs can be computed once (the vision cache); leave it out")
    if gradient_checkpointing:
        use_gradient_checkpointing(model)
    train_mode(model)
    return note


@torch.no_grad()
def generate_captions(model, tokenizer, prompt_ids, image_embeds, num_beams=5, max_new_tokens=30, min_new_tokens=8,
                      repetition_penalty=1.0, no_repeat_ngram_size=0, generation="own", compile=False, num_captions=1):
    """Beam-search captions for (B, V, Dv) image embeddings, as model.generate(**processor(images, text=prompt))
    writes them. generation "own": generation.py's search, the image side once per image (compile: its decode step
    compiled); "transformers": the language model's generate() on the same inputs. Both give the new tokens, ending
    at the family's end token (T5 </s>, OPT "\n"), which decoding drops; tokenizer None: the ids (B, T).
    num_captions N > 1: each image's N best captions, a list of N (the ids: (B * N, T))."""
    settings = dict(num_beams=num_beams, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                    repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size)
    if generation == "own":
        output = generate_ids(model, family(model.config), prompt_ids, image_embeds, compile=compile,
                              num_captions=num_captions, **settings)
    else:
        input_ids = torch.tensor(prompt_ids, device=image_embeds.device).expand(image_embeds.shape[0], -1)
        embeds = embed_prompt(model, input_ids, image_features(model, image_embeds))    # (B, L, D)
        text = model.config.text_config
        output = model.language_model.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(input_ids),
                                               eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id,
                                               num_return_sequences=num_captions, **settings)
    if tokenizer is None:
        return output
    texts = [c.strip() for c in tokenizer.batch_decode(output, skip_special_tokens=True)]
    return texts if num_captions == 1 else [texts[i:i + num_captions] for i in range(0, len(texts), num_captions)]


# ------------------------------------------------------------------------------------------- loading

def download_hint(name=DEFAULT_MODEL):
    folder = "models/" + name.rpartition("/")[2]
    return (f"On a machine with internet: `hf download {name} --local-dir {folder}`, then pass --model={folder}. "
            "Offline demo: python train.py config/demo.py")


def looks_like_hub_id(name):
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not os.path.exists(name)


def check_model_source(name_or_path, log=print):
    """Before any work: a local BLIP-2 folder (safetensors weights only), or a hub id that is cached or can be
    downloaded. Returns local_files_only for from_pretrained. HF_HUB_OFFLINE=1 means: never try the network."""
    if os.path.isdir(name_or_path):
        files = os.listdir(name_or_path)
        pickles = sorted(f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
        if pickles and not any(f.endswith(".safetensors") for f in files):
            raise ModelError(f"{name_or_path}: its weights are {pickles[0]}, a pickle, which can run code when "
                             "loaded; this project loads safetensors weights only. Convert it once where you trust "
                             "the file: from_pretrained(dir).save_pretrained(new_dir) writes model.safetensors")
        return True
    if not looks_like_hub_id(name_or_path):
        raise ModelError(f"model {name_or_path!r}: no such folder. {download_hint()}")
    from huggingface_hub import constants, try_to_load_from_cache
    if isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
        return True  # in the local cache: no network needed
    if constants.HF_HUB_OFFLINE:
        raise ModelError(f"model {name_or_path!r} is not in the local cache and HF_HUB_OFFLINE is set. "
                         f"{download_hint(name_or_path)}")
    unreachable = hub_connection_error(name_or_path)
    if unreachable:
        raise ModelError(f"model {name_or_path!r} is not in the local cache and the Hugging Face hub cannot be "
                         f"reached ({unreachable}). {download_hint(name_or_path)}")
    log(f"downloading {name_or_path} from the Hugging Face hub (set HF_HUB_OFFLINE=1 to never try the network)")
    return False


def hub_connection_error(name):
    """Why the hub cannot be reached, or None: one request for the model's config.json, no retries. Without it, a
    machine with no network spends minutes in huggingface_hub's retries, file after file, before its error
    (3 min 35 s seen with transformers 5.24)."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import get_session
    try:
        get_session().head(hf_hub_url(name, "config.json"), timeout=10)
    except Exception as e:  # httpx's connection errors are no OSError: any failure to connect is the answer
        return first_line(e)
    return None


def check_supported(config, name_or_path):
    """A model this project cannot fine-tune is refused from its config, before any weights are read."""
    text = getattr(config, "text_config", None)
    if config.model_type not in KINDS or getattr(text, "model_type", None) not in FAMILIES:
        what = (f"a model of type {config.model_type!r}" if config.model_type not in KINDS else
                f"{config.model_type} with a language model of type {getattr(text, 'model_type', None)!r}")
        raise ModelError(f"{name_or_path}: {what}; this project fine-tunes BLIP-2 with Flan-T5 or OPT and InstructBLIP "
                         "with Flan-T5 or Vicuna (Salesforce/blip2-flan-t5-xl, blip2-opt-2.7b, instructblip-vicuna-7b, "
                         "...)")
    heads = getattr(text, "num_attention_heads", None)
    if getattr(text, "num_key_value_heads", heads) != heads:  # (LLaMA-2 70B's kind; Vicuna has none)
        raise ModelError(f"{name_or_path}: its language model shares keys and values across heads "
                         f"({text.num_key_value_heads} for {heads} heads), which this project's decode step does not "
                         "handle; the released BLIP-2 and InstructBLIP checkpoints do not")
    for key in ("eos_token_id", "pad_token_id") + ("decoder_start_token_id",) * text.is_encoder_decoder:
        value = getattr(text, key, None)  # a caption's end, its padding, (T5) the decoder's first input
        if type(value) is not int or not 0 <= value < text.vocab_size:
            raise ModelError(f"{name_or_path}: its config.json has text_config.{key}={value!r}; captions need one "
                             f"token id below its vocab_size ({text.vocab_size}) there: use the config.json saved with "
                             "these weights")
    if config.image_token_id is None or not 0 <= config.image_token_id < text.vocab_size:
        raise ModelError(f"{name_or_path}: its config.json has no usable image_token_index ({config.image_token_id!r}):"
                         " BLIP-2 would caption without seeing the image. Use a checkpoint saved by transformers 4.47 "
                         "or newer (the Salesforce ones are)")


def model_class(config):
    """The transformers class of a BLIP-2 or InstructBLIP config (KINDS), for a model built from a config."""
    import transformers
    return getattr(transformers, KINDS[config.model_type][1])


def load_blip2(name_or_path, device="cpu", dtype=torch.float32, base_bits=16, log=print):
    """BLIP-2 or InstructBLIP (KINDS: the model and its processor) from a hub id or a local folder, in eval mode, its
    weights in dtype. base_bits 8 or 4: the language model's Linear weights held by bitsandbytes in int8 or NF4
    (QLoRA's double-quantized 4-bit)."""
    import transformers
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging
    local_only = check_model_source(name_or_path, log)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # keep load reports and progress bars out of the user's output
    hf_logging.disable_progress_bar()
    try:
        config = AutoConfig.from_pretrained(name_or_path, local_files_only=local_only)
        check_supported(config, name_or_path)
        processor_class = getattr(transformers, KINDS[config.model_type][2])
        processor = processor_class.from_pretrained(name_or_path, local_files_only=local_only)
        if getattr(processor, "num_query_tokens", None) != config.num_query_tokens:
            raise ModelError(f"{name_or_path}: its processor puts {processor.num_query_tokens!r} image tokens in a "
                             f"prompt, the model reads {config.num_query_tokens}; save the processor again with "
                             f"num_query_tokens={config.num_query_tokens}")
        extra = {"quantization_config": quantization_config(base_bits, dtype, config),
                 "device_map": {"": device}} if base_bits < 16 else {}
        # sdpa: opt.grouped_caption_loss hands OPT's attention a boolean mask, as scaled_dot_product_attention takes it
        model, report = model_class(config).from_pretrained(
            name_or_path, dtype=dtype, local_files_only=local_only, use_safetensors=True,  # never a pickle
            attn_implementation="sdpa", output_loading_info=True, ignore_mismatched_sizes=True, **extra)
        check_weights_match(report, name_or_path)
        for module in model.modules():  # bitsandbytes' 4-bit layers on a CPU with AVX512-BF16: see _no_cpu_packing
            _no_cpu_packing(module)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load BLIP-2 from {name_or_path!r}: {first_line(e)}. {download_hint()}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    return (model if base_bits < 16 else model.to(device)).eval(), processor


def check_weights_match(report, name_or_path):
    """transformers' loading report (missing, unexpected and mismatched weights), refused in one line: left alone,
    a weight the config expects but the files lack is random, one the files hold but the config has no place for is
    dropped, and one of another shape is random too. Each is a config.json that is not these weights' (a layer count,
    a size or the language model's type edited), and the model would train and caption without a word."""
    missing, unexpected, mismatched = (sorted(report[key]) for key in ("missing_keys", "unexpected_keys",
                                                                       "mismatched_keys"))
    problems = []
    if missing:
        problems.append(f"{len(missing)} weights it describes are not in the files (such as {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} in the files have no place in it (such as {unexpected[0]})")
    if mismatched:
        key, in_files, described = mismatched[0]
        problems.append(f"{len(mismatched)} have another shape ({key}: {tuple(in_files)} in the files, "
                        f"{tuple(described)} by the config)")
    if problems:
        raise ModelError(f"{name_or_path}: its config.json does not describe its weights: {'; '.join(problems)}. Use "
                         "the config.json saved with these weights")


def _no_cpu_packing(module):
    """bitsandbytes (0.50) repacks a 4-bit layer's weights for CPUs with AVX512-BF16 on its first forward without
    gradients in eval mode, and computes in bfloat16 from then on. The frozen base is always in eval mode here, so the
    first evaluation would switch the rest of training to bf16 matmuls, on some CPUs only (one base's 4-bit demo fell
    from CIDEr 311 to 100): turned off, a 4-bit CPU run computes the same way on every CPU, evaluation or not."""
    if getattr(module, "support_avx512bf16_for_cpu", False):
        module.support_avx512bf16_for_cpu = False


def weights_dtype(device, compute_dtype):
    """The frozen weights in the compute dtype on a GPU (half the memory), float32 on the CPU."""
    return compute_dtype if str(device).startswith("cuda") else torch.float32


def load_prepared(name_or_path, device, compute_dtype, base_bits=16, log=print):
    """load_blip2 for running on `device` with matmuls in compute_dtype, then prepare: caption.py's and evaluate.py's
    loading (train.py prepares for training instead: prepare_for_training)."""
    model, processor = load_blip2(name_or_path, device, dtype=weights_dtype(device, compute_dtype),
                                  base_bits=base_bits, log=log)
    note = prepare(model, compute_dtype)
    if note:
        log(note)
    return model, processor


class _Once(logging.Filter):
    """Lets each distinct message through once."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def filter(self, record):
        message = record.getMessage()
        new = message not in self.seen
        self.seen.add(message)
        return new


ONCE = _Once()


def unquantized(config):
    """The module-path patterns a 4/8-bit base keeps 16-bit: BLIP-2's parts and the family's (matched as transformers
    matches them: a path from its start to a module boundary, or a suffix)."""
    return [*KEEP_UNQUANTIZED, *family(config).KEEP_UNQUANTIZED]


def quantization_config(base_bits, compute_dtype, config):
    """bitsandbytes for the frozen language model only: BLIP-2's ViT, Q-Former, projection and lm_head stay 16-bit, and
    what the family keeps (unquantized). 4-bit is QLoRA's recipe: NF4, double quantization."""
    try:
        import bitsandbytes  # noqa: F401  (imported only when asked for)
    except ImportError:
        raise ModelError(f"base_bits={base_bits} needs bitsandbytes: pip install bitsandbytes") from None
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("bitsandbytes")]:
        logging.getLogger(name).addFilter(ONCE)  # its notices (24 in 3 steps of an 8-bit run): each said once
    from transformers import BitsAndBytesConfig
    keep = unquantized(config)
    if base_bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=keep)
