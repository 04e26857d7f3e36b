"""Pre-training corpus and tokenizer for the synthetic_arith task.

The corpus mixes four kinds of documents: arithmetic facts in the trace notation
("3+4=7", "2*5=<<2*5=10>>10"), number words ("twelve is 12."), short generic
sentences in the task's (train) vocabulary, and fully worked problems rendered with
the task's prompt template. Worked problems come from their own seed stream and
never share a canonical key with any problem of the task's train, test or OOD
splits; they use only train phrasings and step counts, so OOD stays unseen.

The tokenizer is a small byte-level BPE trained on that corpus, with every digit
its own token, so arithmetic is done digit by digit and any ASCII text round-trips.
"""
from __future__ import annotations

import dataclasses
import random
import re
from typing import TYPE_CHECKING, Mapping

from memdyn_jax.tasks import synthetic_arith as sa

if TYPE_CHECKING:
  from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
                  "unk_token": "<unk>"}
DOC_KINDS = ("facts", "numbers", "sentences", "problems")
DEFAULT_MIX = {"facts": 0.25, "numbers": 0.1, "sentences": 0.15, "problems": 0.5}

_UNITS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
          "fourteen fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()

_SENTENCES = (
    "{name} has some {obj}.", "{name} likes {obj}.", "{name} buys {obj} in {container}.",
    "{other} sells {obj} to {name}.", "{name} gives {obj} to {other}.",
    "{name} keeps the {obj} in {container}.", "{S} finds more {obj}.",
    "{name} shares the {obj} with {other}.", "{S} loses some {obj}.",
    "{name} and {other} count {his} {obj}.", "{S} fills the {container} with {obj}.",
    "{name} splits the {obj} into equal piles.", "{S} gets {obj} from {other}.",
    "{name} owns many {obj}.", "{S} starts with a few {obj}.",
    # Words of the OOD phrasings, in sentences without numbers: OOD is meant to test
    # unseen templates, not unknown words (which would also blow up token counts).
    "{name} counts {his} {obj} every morning.", "{S} orders new {obj} and a delivery brings them.",
    "{name} ships {container} to {other}.", "{other} purchases {obj} from a shop.",
    "{S} is sad when {obj} go missing.", "Later, {name} picks up {his} {obj}.",
    "Each of the children takes a share.", "{S} puts the extra {obj} on a big pile.",
    "What {obj} does {name} like?", "The {container} contain {obj} that {name} holds.",
    "{S} replaced the old {obj} with new ones.", "At first, {name} has no {obj}.",
    "{name} ends up happy.", "The number of {obj} becomes large.",
    "{S} gives {him}self another {obj} that {other} added to the pile. Sadly, it is just one.",
    "{other} takes the {container} from {him} and keeps {his} share.",
    "Count the {obj}, {name}! The children are included.",
)


@dataclasses.dataclass(frozen=True)
class CorpusDoc:
  """One pre-training document.

  Attributes:
    kind: one of DOC_KINDS.
    text: the document text.
    key: canonical problem key for "problems" documents, else None.
  """

  kind: str
  text: str
  key: str | None = None


def number_word(n: int) -> str:
  """English word for 0 <= n <= 99 ("forty-two")."""
  if not 0 <= n <= 99:
    raise ValueError(f"number_word supports 0..99, got {n}")
  if n < 20:
    return _UNITS[n]
  tens, units = divmod(n, 10)
  return _TENS[tens] + ("-" + _UNITS[units] if units else "")


def _fact(rng: random.Random, max_value: int) -> str:
  """One true arithmetic fact with all numbers in [0, max_value]."""
  op = rng.choice("+-*/")
  if op == "+":
    c = rng.randint(0, max_value)
    a = rng.randint(0, c)
    b = c - a
  elif op == "-":
    a = rng.randint(0, max_value)
    b = rng.randint(0, a)
    c = a - b
  elif op == "*":
    a = rng.randint(1, 12)
    b = rng.randint(0, max_value // a)
    c = a * b
  else:
    b = rng.randint(1, 9)
    c = rng.randint(0, max_value // b)
    a = b * c
  expr = f"{a}{op}{b}"
  # Both the bare and the annotated form, as in traces.
  return f"{expr}={c}" if rng.random() < 0.5 else f"{expr}=<<{expr}={c}>>{c}"


def _chain(rng: random.Random, max_value: int, n: int) -> list[str]:
  """n true facts, each after the first starting from the previous result ("4+3=7",
  "7*2=14", ...): the next line can only be written by reading the one before, which is
  how a model learns to carry intermediate results through a multi-step trace."""
  facts = [_fact(rng, max_value)]
  for _ in range(n - 1):
    a = int(facts[-1].rsplit("=", 1)[-1].rsplit(">>", 1)[-1])
    ops = (["+"] if a < max_value else []) + (["-"] if a > 0 else [])
    ops += ["*"] if 0 < a <= max_value // 2 else []
    divisors = [b for b in range(2, 10) if a and a % b == 0]
    ops += ["/"] if divisors else []
    op = rng.choice(ops or ["+"])
    if op == "+":
      b = rng.randint(1, max_value - a) if a < max_value else 0
      c = a + b
    elif op == "-":
      b = rng.randint(1, a)
      c = a - b
    elif op == "*":
      b = rng.randint(2, max(2, max_value // a))
      c = a * b
    else:
      b = rng.choice(divisors)
      c = a // b
    expr = f"{a}{op}{b}"
    facts.append(f"{expr}={c}" if rng.random() < 0.5 else f"{expr}=<<{expr}={c}>>{c}")
  return facts


def _sentences(rng: random.Random, n: int) -> str:
  """n generic sentences about one protagonist (so pronouns agree)."""
  name, gender = rng.choice(sa.NAMES)
  out = []
  for _ in range(n):
    fill = dict(sa._PRONOUNS[gender], name=name, obj=rng.choice(sa.OBJECTS),
                container=rng.choice(sa.CONTAINERS),
                other=rng.choice([n for n, _ in sa.NAMES if n != name]))
    out.append(rng.choice(_SENTENCES).format(**fill))
  return " ".join(out)


def corpus_documents(n_docs: int, seed: int = 0, task: sa.SyntheticArithTask | None = None,
                     mix: Mapping[str, float] | None = None,
                     chain_fraction: float = 0.0) -> list[CorpusDoc]:
  """Generates the pre-training corpus with document kinds and problem keys.

  Args:
    n_docs: number of documents.
    seed: corpus seed (a stream separate from the task's split streams).
    task: the task whose splits must be excluded; default `SyntheticArithTask()`.
      Pass the task used in the experiment, or its held-out problems may leak.
    mix: relative weights of DOC_KINDS; default DEFAULT_MIX.
    chain_fraction: share of "facts" documents written as chains (`_chain`), the rest
      independent facts.

  Returns:
    The documents, deterministic in (n_docs, seed, task config, mix).
  """
  task = task or sa.SyntheticArithTask()
  mix = dict(mix or DEFAULT_MIX)
  unknown = set(mix) - set(DOC_KINDS)
  if unknown:
    raise ValueError(f"unknown document kinds {sorted(unknown)}; expected {DOC_KINDS}")
  kinds = [k for k in DOC_KINDS if mix.get(k, 0) > 0]
  weights = [mix[k] for k in kinds]
  # Exclude train too: pre-training on train problems would pre-memorize them.
  taken = set().union(*(task.keys(s) for s in sa.SPLITS))
  rng = random.Random(f"synthetic_arith/{seed}/corpus")
  docs = []
  for _ in range(n_docs):
    kind = rng.choices(kinds, weights)[0]
    if kind == "facts":
      n = rng.randint(3, 8)
      facts = (_chain(rng, task.max_value, n) if chain_fraction and rng.random() < chain_fraction
               else [_fact(rng, task.max_value) for _ in range(n)])
      text = "\n".join(facts)
      docs.append(CorpusDoc(kind, text))
    elif kind == "numbers":
      nums = [rng.randint(0, task.max_value) for _ in range(rng.randint(3, 8))]
      text = " ".join(f"{number_word(n).capitalize()} is {n}." if rng.random() < 0.5
                      else f"{n} is {number_word(n)}." for n in nums)
      docs.append(CorpusDoc(kind, text))
    elif kind == "sentences":
      docs.append(CorpusDoc(kind, _sentences(rng, rng.randint(2, 5))))
    else:
      while True:
        problem = task._sample(rng, "train")
        if problem.key not in taken:
          break
      # A random (not the hash-chosen target) trace: pre-training sees every style.
      text = (task.format_prompt(sa.render_question(problem))
              + task.template.target(sa._random_trace(problem, rng)))
      docs.append(CorpusDoc(kind, text, problem.key))
  return docs


def pretraining_corpus(n_docs: int, seed: int = 0, task: sa.SyntheticArithTask | None = None,
                       mix: Mapping[str, float] | None = None,
                       chain_fraction: float = 0.0) -> list[str]:
  """Texts of `corpus_documents(n_docs, seed, task, mix, chain_fraction)`."""
  return [d.text for d in corpus_documents(n_docs, seed, task, mix, chain_fraction)]


def _byte_alphabet() -> list[str]:
  """Byte-level symbols of tab, newline and printable ASCII (GPT-2 byte-to-unicode)."""
  # GPT-2 maps printable bytes to themselves and the rest, in order, to chr(256 + i).
  keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
      + list(range(ord("®"), ord("ÿ") + 1))
  shifted, table = 0, {}
  for byte in range(256):
    if byte in keep:
      table[byte] = chr(byte)
    else:
      table[byte] = chr(256 + shifted)
      shifted += 1
  return [table[b] for b in [9, 10] + list(range(32, 127))]


def _lexicon() -> list[str]:
  """Every word of the task's templates (train and OOD), in both casings seen in text."""
  texts = [t for pool in sa.PHRASINGS.values() for ts in pool.values() for t in ts]
  texts += list(_SENTENCES) + list(sa.CONNECTORS) + ["has hold the The Answer Done"]
  texts += [n for n, _ in sa.NAMES] + list(sa.OBJECTS) + list(sa.CONTAINERS)
  texts += [w for p in sa._PRONOUNS.values() for w in p.values()] + ["himself herself"]
  words = set()
  for t in texts:
    words.update(re.findall(r"(?<![{A-Za-z])[A-Za-z]+(?![}A-Za-z])", t))
  return sorted(words)


def build_tokenizer(out_dir: str | None = None, seed: int = 0, vocab_size: int = 512,
                    n_docs: int = 4000, lexicon_repeats: int = 500,
                    task: sa.SyntheticArithTask | None = None,
                    whole_numbers: int = 0) -> "PreTrainedTokenizerFast":
  """Trains a byte-level BPE on the pre-training corpus and wraps it for transformers.

  By default digits are split into single-digit pre-tokens, so every digit is one token
  and no merge spans digits. With `whole_numbers=N`, digit runs stay whole and every
  number 0..N is one token (larger numbers fall back to BPE pieces): arithmetic on small
  numbers becomes a lookup over number tokens, which a tiny model learns from far fewer
  tokens than digit-wise carrying. No merge ever joins digits and non-digits. The byte-level pre-tokenizer (no prefix space) and decoder make
  decode(encode(x)) == x for any ASCII text, spaces and newlines included. Encoding
  prepends `<s>` (Llama convention; pass add_special_tokens=False to avoid it); eos
  `</s>`, pad `<pad>` and unk `<unk>` are defined but never added automatically.

  Args:
    out_dir: where to `save_pretrained` (loadable with AutoTokenizer); None: no save.
    seed: corpus seed.
    vocab_size: total vocabulary, special tokens and byte alphabet included.
    n_docs: corpus documents to train on.
    lexicon_repeats: copies of the template-word lexicon added to the training text.
    task: forwarded to `pretraining_corpus`.
    whole_numbers: 0, or the largest number guaranteed to be a single token.

  Returns:
    The tokenizer (reloaded from out_dir when given, so it is what others load).
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=not whole_numbers),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
  ])
  tok.decoder = decoders.ByteLevel()
  specials = [SPECIAL_TOKENS[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")]
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                initial_alphabet=_byte_alphabet(), show_progress=False)
  # The lexicon makes every template word (OOD ones too, which are rare in the corpus)
  # a merge candidate, so OOD questions are not shredded into characters.
  # Joined by spaces and by newlines: words occur both after a space and line-initially.
  words = _lexicon() + [str(n) for n in range(whole_numbers + 1 if whole_numbers else 0)]
  lexicon = [" ".join(words), "\n".join(words)]
  texts = pretraining_corpus(n_docs, seed, task) + lexicon * lexicon_repeats
  tok.train_from_iterator(texts, trainer=trainer)
  if whole_numbers:
    split = [n for n in range(whole_numbers + 1) if tok.token_to_id(str(n)) is None]
    if split:  # vocab_size too small for the lexicon plus the numbers
      raise ValueError(f"vocab_size={vocab_size} leaves numbers {split[:5]}... in pieces; "
                       f"raise vocab_size or lower whole_numbers={whole_numbers}")
  bos = SPECIAL_TOKENS["bos_token"]
  tok.post_processor = processors.TemplateProcessing(
      single=f"{bos} $A", pair=f"{bos} $A $B:1", special_tokens=[(bos, tok.token_to_id(bos))])
  hf = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False,
                               **SPECIAL_TOKENS)
  if out_dir is None:
    return hf
  hf.save_pretrained(out_dir)
  return PreTrainedTokenizerFast.from_pretrained(out_dir)
