"""PC layer: polynomial weight preconditioning (arXiv 2606.06470) as a parametrization."""

from specopt.pc.design import design_odd_polynomial
from specopt.pc.parametrization import (
    DEFAULT_PC_TARGETS,
    PC_KINDS,
    PC_TARGET_TABLE,
    QKV_NAMES,
    QKV_TARGETS,
    PCHandle,
    PCParametrization,
    apply_pc,
    get_pc,
    is_pc_module,
    merge_pc,
    merged_state_dict,
    pc_weight,
)
from specopt.pc.polynomials import (
    PC_LEVELS,
    OddPolynomial,
    odd_matrix_polynomial,
    resolve_polynomial,
)

__all__ = [
    "DEFAULT_PC_TARGETS",
    "PC_KINDS",
    "PC_LEVELS",
    "PC_TARGET_TABLE",
    "QKV_NAMES",
    "QKV_TARGETS",
    "OddPolynomial",
    "PCHandle",
    "PCParametrization",
    "apply_pc",
    "design_odd_polynomial",
    "get_pc",
    "is_pc_module",
    "merge_pc",
    "merged_state_dict",
    "odd_matrix_polynomial",
    "pc_weight",
    "resolve_polynomial",
]
