"""Tasks and data: GSM8K, MATH, instruction SFT, prompt perturbations and tokenization.

Importing this package registers every task with `get_task`.
"""
from memdyn_jax.tasks import gsm8k, math_task, sft, synthetic_arith  # Imported for registration.
from memdyn_jax.tasks.base import (
    DEFAULT_TEMPLATE,
    PROMPT_OPTION_NAMES,
    ChatTemplate,
    ChatTemplateError,
    DataError,
    Example,
    GradeResult,
    PromptOptions,
    PromptSetupError,
    PromptTemplate,
    Task,
    UnknownTaskError,
    canonical_task_kwargs,
    ensure_nonempty,
    get_task,
    memorization_threshold,
    task_class,
    read_jsonl,
    write_jsonl,
    register_task,
    resolve_split_path,
    split_prompt_kwargs,
    task_names,
)
from memdyn_jax.tasks.gsm8k import GSM8KTask
from memdyn_jax.tasks.math_task import MathTask
from memdyn_jax.tasks.perturb import (
    DEFAULT_PERTURBATIONS,
    PerturbedPrompt,
    expand_perturbations,
    format_prompt,
)
from memdyn_jax.tasks.sft import SFTTask
from memdyn_jax.tasks.tokenize import (
    OVERLENGTH_POLICIES,
    TargetBoundaryError,
    TokenizedBatch,
    encode_example,
    tokenize_examples,
    tokenize_task_examples,
    tokenizer_adds_bos,
)
