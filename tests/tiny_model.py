"""A tiny random Llama with a real ChatML tokenizer, and a tiny random BERT with a real WordPiece tokenizer,
each built offline in well under a second.

Shared by tests that need something `AutoModelForCausalLM` (or another auto class) / `AutoTokenizer` can
load from disk.
"""

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
WORDPIECE_VOCAB = Path(__file__).with_name("tiny_wordpiece_vocab.txt")

# SmolLM2's ChatML shape, without its default system prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = """\
system user assistant tool developer
You are a helpful assistant. Answer the question in one short sentence and then stop.
What is the capital of France? The capital of France is Paris.
What is the capital of Spain? The capital of Spain is Madrid.
What is the capital of Italy? The capital of Italy is Rome.
What is two plus two? Two plus two is four. What is three plus four? Three plus four is seven.
Name a colour of the sky. The sky is blue on a clear day and grey when it rains.
Translate hello into French. Hello in French is bonjour. Goodbye in French is au revoir.
The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.
A tokenizer splits text into tokens, and a language model predicts the next token from the ones before it.
Fine tuning adapts a pretrained model to new data with a small learning rate for a few epochs.
Low rank adapters train two small matrices per layer instead of the full weight matrix.
The weather today is sunny with a light wind from the west and no rain expected until the evening.
Please call the weather tool with the city name, then read its answer and reply to the user.
Numbers: zero one two three four five six seven eight nine ten eleven twelve twenty hundred thousand.
Days: Monday Tuesday Wednesday Thursday Friday Saturday Sunday. Months: January February March April May.
Fruit: apple banana cherry grape lemon mango orange peach pear plum strawberry watermelon.
Animals: bird cat cow dog duck fish fox horse lion mouse owl pig rabbit sheep tiger whale wolf.
"""


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (as SmolLM2/GPT-2) trained on CORPUS; eos `<|im_end|>`, deliberately no pad token."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=None,
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_llama(
    path: Path, seed: int = 0, tie_word_embeddings: bool = False, head_dim: int | None = None
) -> Path:
    """Save a random-weight LlamaForCausalLM (safetensors) and its tokenizer into `path`; return `path`.
    `tie_word_embeddings`: the LM head shares the input embeddings, as in SmolLM2. `head_dim` widens the
    attention heads past hidden_size / heads (vLLM's CPU attention takes 32 and up)."""
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        intermediate_size=64,
        max_position_embeddings=512,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_wordpiece_tokenizer() -> PreTrainedTokenizerFast:
    """BERT's uncased WordPiece with the 256 pieces in WORDPIECE_VOCAB, which the tokenizers trainer once
    made from CORPUS: small enough that rarer words split into several. Stored, not trained here: the
    trainer breaks ties differently in every process, and a base that changed from run to run made tests
    flaky."""
    pieces = WORDPIECE_VOCAB.read_text(encoding="utf-8").splitlines()
    tokenizer = Tokenizer(models.WordPiece({piece: i for i, piece in enumerate(pieces)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def build_tiny_bert(path: Path, seed: int = 0) -> Path:
    """Save a random-weight BertModel (an encoder checkpoint with its pooler, like all-MiniLM-L6-v2;
    safetensors) and its tokenizer into `path`; return `path`."""
    tokenizer = build_wordpiece_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = BertModel(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
