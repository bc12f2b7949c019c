"""Tiny random models with a locally trained tokenizer, built deterministically offline.

They exist for unit tests and smoke runs. ``tiny-llama``, ``tiny-gpt2`` and ``tiny-bert`` are
registry models, written once to a folder and then loaded like any local model.
:data:`TINY_FAMILIES` describes one tiny configuration of every supported family (the
transformers config class and its arguments, as data); :func:`tiny_family` builds one in
memory, with the local tokenizer, as a user would hold it.
"""

from __future__ import annotations

import json
import logging
import re
import string
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

TINY_VERSION = 3

# A small corpus of cloze-style sentences. The tokenizers are trained on it, so the
# facts used in tests and tutorials tokenize into a handful of pieces.
_CORPUS = [
    "The capital of France is Paris .",
    "The capital of Germany is Berlin .",
    "The capital of Italy is Rome .",
    "The capital of Spain is Madrid .",
    "The capital of Japan is Tokyo .",
    "France's capital city is Paris .",
    "Paris is the capital of France .",
    "The official language of France is French .",
    "The official language of Germany is German .",
    "The official language of Italy is Italian .",
    "The official language of Spain is Spanish .",
    "The official language of Japan is Japanese .",
    "People in France speak French .",
    "Albert Einstein was born in Ulm .",
    "Marie Curie was born in Warsaw .",
    "Dante was born in Florence .",
    "Mozart was born in Salzburg .",
    "The Eiffel Tower is located in Paris .",
    "The Colosseum is located in Rome .",
    "London is the capital of England .",
    "Water is made of hydrogen and oxygen .",
    "The sun rises in the east and sets in the west .",
    "A dog is an animal , a rose is a flower .",
    "She works as a doctor , he works as a teacher .",
    "The city of Berlin is in Germany . Tokyo is a city in Japan .",
]

_SPECIAL_CAUSAL = ["<unk>", "<s>", "</s>"]
_SPECIAL_BERT = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _corpus() -> list[str]:
    # lower-case copies help the uncased BERT vocabulary; repeats stabilise BPE merges
    return _CORPUS * 3 + [s.lower() for s in _CORPUS]


def _causal_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=_SPECIAL_CAUSAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="</s>", model_max_length=64,
    )


def _bert_tokenizer():
    """WordPiece with a fixed vocabulary (specials, characters, corpus words): deterministic."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    chars = string.ascii_lowercase + string.digits + string.punctuation
    words = sorted({w for s in _CORPUS for w in re.findall(r"[a-z]+", s.lower())})
    vocab_list = [*_SPECIAL_BERT, *chars, *(f"##{c}" for c in chars), *words]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(vocab_list))}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return BertTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
        cls_token="[CLS]", mask_token="[MASK]", model_max_length=64,
    )


def _tiny_llama(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    )
    return LlamaForCausalLM(cfg)


def _tiny_gpt2(vocab_size: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=3, n_head=4, n_inner=48,
        bos_token_id=1, eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg)


def _tiny_bert(vocab_size: int):
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, pad_token_id=0,
    )
    return BertForMaskedLM(cfg)


_CAUSAL = dict(vocab_size=0, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
               pad_token_id=2)
_GQA = dict(num_key_value_heads=2)

#: family -> (transformers config class, its arguments, masked LM?). ``vocab_size=0`` is filled
#: with the tokenizer's size. Small sliding windows make the window matter on short prompts.
TINY_FAMILIES: dict[str, tuple[str, dict, bool]] = {
    "llama": ("LlamaConfig", {**_CAUSAL, **_GQA}, False),
    "mistral": ("MistralConfig", {**_CAUSAL, **_GQA, "sliding_window": 4}, False),
    "qwen2": ("Qwen2Config", {**_CAUSAL, **_GQA}, False),
    "qwen3": ("Qwen3Config", {**_CAUSAL, **_GQA, "head_dim": 8}, False),
    "gemma": ("GemmaConfig", {**_CAUSAL, "num_key_value_heads": 1, "head_dim": 8}, False),
    "gemma2": ("Gemma2Config", {**_CAUSAL, **_GQA, "head_dim": 8, "sliding_window": 4}, False),
    "gemma3": ("Gemma3TextConfig", {**_CAUSAL, **_GQA, "head_dim": 8, "sliding_window": 4}, False),
    "phi": ("PhiConfig", {**_CAUSAL, "partial_rotary_factor": 0.5}, False),
    "phi3": ("Phi3Config", {**_CAUSAL, **_GQA}, False),
    "olmo": ("OlmoConfig", dict(_CAUSAL), False),
    "olmo2": ("Olmo2Config", dict(_CAUSAL), False),
    "granite": ("GraniteConfig", {**_CAUSAL, "logits_scaling": 8.0, "residual_multiplier": 0.5,
                                  "embedding_multiplier": 2.0, "attention_multiplier": 0.3}, False),
    "smollm3": ("SmolLM3Config", {**_CAUSAL, **_GQA, "no_rope_layer_interval": 2}, False),
    "stablelm": ("StableLmConfig", {**_CAUSAL, **_GQA}, False),
    "cohere": ("CohereConfig", {**_CAUSAL, **_GQA}, False),
    "starcoder2": ("Starcoder2Config", {**_CAUSAL, **_GQA}, False),
    "gpt2": ("GPT2Config", dict(vocab_size=0, n_embd=32, n_layer=2, n_head=4, n_inner=48, n_positions=64,
                                bos_token_id=1, eos_token_id=2), False),
    "gpt_neo": ("GPTNeoConfig", dict(vocab_size=0, hidden_size=32, num_layers=2, num_heads=4,
                                     intermediate_size=48, attention_types=[[["global", "local"], 1]],
                                     window_size=4, max_position_embeddings=64, bos_token_id=1,
                                     eos_token_id=2), False),
    "gptj": ("GPTJConfig", dict(vocab_size=0, n_embd=32, n_layer=2, n_head=4, n_inner=48, rotary_dim=4,
                                n_positions=64, bos_token_id=1, eos_token_id=2), False),
    "gpt_neox": ("GPTNeoXConfig", dict(vocab_size=0, hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, intermediate_size=48,
                                       max_position_embeddings=64, bos_token_id=1, eos_token_id=2), False),
    "opt": ("OPTConfig", dict(vocab_size=0, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              ffn_dim=48, word_embed_proj_dim=32, max_position_embeddings=64,
                              bos_token_id=1, eos_token_id=2, pad_token_id=2), False),
    "falcon": ("FalconConfig", dict(vocab_size=0, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    ffn_hidden_size=48, bos_token_id=1, eos_token_id=2), False),
    "bloom": ("BloomConfig", dict(vocab_size=0, hidden_size=32, n_layer=2, n_head=4, bos_token_id=1,
                                  eos_token_id=2, pad_token_id=2), False),
    "gpt_bigcode": ("GPTBigCodeConfig", dict(vocab_size=0, n_embd=32, n_layer=2, n_head=4, n_inner=48,
                                             n_positions=64, bos_token_id=1, eos_token_id=2), False),
    "bert": ("BertConfig", dict(vocab_size=0, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=48, max_position_embeddings=64, pad_token_id=0), True),
    "roberta": ("RobertaConfig", dict(vocab_size=0, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=48, max_position_embeddings=70, pad_token_id=0), True),
    "xlm-roberta": ("XLMRobertaConfig", dict(vocab_size=0, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=48,
                                             max_position_embeddings=70, pad_token_id=0), True),
    "distilbert": ("DistilBertConfig", dict(vocab_size=0, dim=32, n_layers=2, n_heads=4, hidden_dim=48,
                                            max_position_embeddings=64, pad_token_id=0), True),
    "electra": ("ElectraConfig", dict(vocab_size=0, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=48,
                                      max_position_embeddings=64, pad_token_id=0), True),
}

#: mixture-of-experts configurations: refused (knowledge neurons are defined for dense FFNs)
TINY_MOE: dict[str, tuple[str, dict, bool]] = {
    "mixtral": ("MixtralConfig", {**_CAUSAL, **_GQA, "num_local_experts": 4}, False),
    "qwen2_moe": ("Qwen2MoeConfig", {**_CAUSAL, **_GQA, "num_experts": 4, "moe_intermediate_size": 16,
                                     "shared_expert_intermediate_size": 16}, False),
}


def _init_weights(model, seed: int) -> None:
    """Weights with a larger scale than the Hugging Face default, so that the random models
    have non-trivial, input-dependent predictions; deterministic, global RNG untouched."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
            elif pname.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def _seeded_model(make, seed: int):
    """``make()`` under a fixed seed, then :func:`_init_weights`; the global RNG is restored."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = make()
    finally:
        torch.random.set_rng_state(state)
    _init_weights(model, seed)
    return model


def tiny_family(family: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)``: a tiny random model of ``family`` (see :data:`TINY_FAMILIES` and
    :data:`TINY_MOE`), built in memory from its transformers config, in eval mode."""
    import transformers

    spec = TINY_FAMILIES.get(family) or TINY_MOE.get(family)
    if spec is None:
        raise KeyError(f"no tiny configuration for {family!r}")
    config_name, kwargs, masked = spec
    tokenizer = _bert_tokenizer() if masked else _causal_tokenizer()
    config = getattr(transformers, config_name)(**{**kwargs, "vocab_size": len(tokenizer)})
    auto = transformers.AutoModelForMaskedLM if masked else transformers.AutoModelForCausalLM
    model = _seeded_model(lambda: auto.from_config(config, dtype=torch.float32), seed)
    return model.to(dtype).eval(), tokenizer


TINY_BUILDERS = {
    "tiny-llama": (_causal_tokenizer, _tiny_llama),
    "tiny-gpt2": (_causal_tokenizer, _tiny_gpt2),
    "tiny-bert": (_bert_tokenizer, _tiny_bert),
}


def build_tiny(name: str, folder: Path, seed: int = 0) -> Path:
    """Build the tiny model ``name`` with a fixed seed and save it (with its tokenizer) to ``folder``.

    The weights are drawn with a larger scale than the Hugging Face default so that the
    random models have non-trivial, input-dependent predictions.
    """
    make_tok, make_model = TINY_BUILDERS[name]
    tokenizer = make_tok()
    model = _seeded_model(lambda: make_model(len(tokenizer)), seed)
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "kn_plugin.json").write_text(json.dumps({"tiny": name, "version": TINY_VERSION}))
    logger.info("built %s in %s", name, folder)
    return folder
