"""Reading a compiled program's HLO text: its collectives (kind, operand bytes, executions
per call, loops counted by their trip count) and its attention kernels (Mosaic TPU custom
calls, cuDNN fused attention)."""
from __future__ import annotations

import dataclasses
import math
import re

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

_DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
                "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
                "c64": 8, "c128": 16, "token": 0}


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective kind in a compiled program, per device.

  Attributes:
    kind: "all-reduce", "all-gather", "reduce-scatter", "all-to-all" or
      "collective-permute".
    ops: instructions of this kind in the HLO text.
    executions: times they run per call (while-loop bodies counted by their trip count).
    operand_bytes: bytes of the operands of one execution of each op, summed over ops.
    bytes_per_call: operand bytes summed over executions (what the program feeds into
      this kind of collective per call).
    largest_operand_bytes: the largest single op's operand bytes.
  """

  kind: str
  ops: int
  executions: int
  operand_bytes: int
  bytes_per_call: int
  largest_operand_bytes: int


_COMP_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (.*?) ([a-z][\w\-]*)\(")
_OPERAND_NAME = re.compile(r"%([\w.\-]+)")
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_CALLEE = re.compile(r"\b(to_apply|calls|body|condition|true_computation|false_computation)="
                     r"%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _shape_bytes(text: str) -> int:
  total = 0
  for dtype, dims in _SHAPE.findall(text):
    n = math.prod(int(x) for x in dims.split(",") if x) if dims else 1
    total += n * _DTYPE_BYTES[dtype]
  return total


def _operands(line: str, start: int) -> str:
  """The text inside the parentheses opening at `start` (balanced)."""
  depth = 0
  for i in range(start, len(line)):
    if line[i] == "(":
      depth += 1
    elif line[i] == ")":
      depth -= 1
      if depth == 0:
        return line[start + 1:i]
  return line[start + 1:]


def hlo_collectives(hlo_text: str) -> tuple[Collective, ...]:
  """Collectives of an HLO module's text, with operand sizes and per-call execution counts.

  An op inside a while-loop body (a `lax.scan` over layers or micro-batches) runs once
  per iteration: the loop's `known_trip_count` multiplies its executions, nested loops
  multiply. A loop without a known trip count counts once.
  """
  comps: dict[str, list[str]] = {}
  entry = None
  current = None
  for line in hlo_text.splitlines():
    if current is None:
      m = _COMP_HEADER.match(line)
      if m and "=" not in line.split("(")[0]:
        current = m.group(2)
        comps[current] = []
        if m.group(1):
          entry = current
      continue
    if line.strip() == "}":
      current = None
      continue
    comps[current].append(line)
  if entry is None:
    return ()

  # Executions per call of each computation, following calls from the entry.
  mult: dict[str, int] = {}

  def visit(name: str, times: int) -> None:
    if name not in comps or mult.get(name, 0) >= times:
      return
    mult[name] = times
    for line in comps[name]:
      trip = _TRIP_COUNT.search(line)
      for attr, callee in _CALLEE.findall(line):
        n = int(trip.group(1)) if (attr == "body" and trip) else 1
        visit(callee, times * n)
      for group in _BRANCHES.findall(line):
        for callee in group.split(","):
          visit(callee.strip().lstrip("%"), times)

  visit(entry, 1)
  # Optimised HLO names operands without their shapes: look them up by name.
  types: dict[str, str] = {}
  for lines in comps.values():
    for line in lines:
      m = _INSTRUCTION.match(line)
      if m:
        types[m.group(1)] = m.group(2)
  stats: dict[str, list[int]] = {k: [0, 0, 0, 0, 0] for k in COLLECTIVES}
  for name, lines in comps.items():
    times = mult.get(name, 0)
    if not times:
      continue
    for line in lines:
      m = _INSTRUCTION.match(line)
      kind = m.group(3).removesuffix("-start") if m else None
      if kind not in stats:
        continue
      operands = _OPERAND_NAME.findall(_operands(line, m.end() - 1))
      nbytes = sum(_shape_bytes(types.get(name, "")) for name in operands)
      s = stats[kind]
      s[0] += 1
      s[1] += times
      s[2] += nbytes
      s[3] += nbytes * times
      s[4] = max(s[4], nbytes)
  return tuple(Collective(k, *v) for k, v in stats.items() if v[0])


_MOSAIC_CALL = re.compile(r'custom_call_target="tpu_custom_call"')
_CUDNN_ATTENTION_CALL = re.compile(r'custom_call_target="__cudnn\$fmha')


def mosaic_calls(hlo_text: str) -> int:
  """Mosaic (Pallas TPU) kernel calls in a compiled module's text: the splash attention
  kernels show up here, an einsum attention does not."""
  return len(_MOSAIC_CALL.findall(hlo_text))


def cudnn_attention_calls(hlo_text: str) -> int:
  """cuDNN fused-attention calls (forward and backward) in a compiled XLA:GPU module."""
  return len(_CUDNN_ATTENTION_CALL.findall(hlo_text))
