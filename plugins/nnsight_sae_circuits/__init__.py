"""First-party circuit discovery: tasks (ioi, greater-than, docstring; JSONL task files) and
head-scoring methods (attribution, the default; code-overlap and its edge variant; mean-diff)."""

from nnsight_sae import hookimpl

from .attribution import Attribution
from .code_overlap import CodeOverlap, CodeOverlapEdges
from .mean_diff import MeanDiff
from .tasks import DocstringTask, FileTask, GreaterThanTask, IOITask


@hookimpl
def nnsight_sae_tasks():
    return [IOITask(), GreaterThanTask(), DocstringTask()]


@hookimpl
def nnsight_sae_task_from_path(path):
    return FileTask.open(path)


@hookimpl
def nnsight_sae_circuit_methods():
    return [Attribution(), CodeOverlap(), CodeOverlapEdges(), MeanDiff()]
