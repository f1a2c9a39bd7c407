"""Other libraries' values whose pickled state is no stable key, as plain values to hash.

Torch tensors pickle through their storage (its address), a ``torch.Generator`` through a
tensor, pandas extension arrays with the caches they fill when used, pyarrow tables with their
chunking, numba dispatchers with compiled state and ``torch.compile`` wrappers as torch's own
code. :func:`plain_form` gives each as what it means instead — a tensor's dtype, shape,
strides and bytes; a generator's state; an array's values; a table's logical content; the
wrapped Python function — for :mod:`cachedload.hashing` to hash like any tuple.

Nothing here imports those libraries: a value's library is looked up in ``sys.modules`` (it is
loaded, since the value exists), so ``import cachedload`` stays as cheap as it was.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import numpy as np

__all__ = ["compiled_function", "plain_form"]

_LIBRARIES = frozenset({"torch", "pandas", "pyarrow", "numba"})


def plain_form(value: object) -> tuple[object, ...] | None:
    """``value`` as a tuple of plain values (str, int, tuples, dicts, numpy arrays,
    functions) that says what it means, or None if it is none of the types above."""
    library = type(value).__module__.partition(".")[0]
    if library not in _LIBRARIES or library not in sys.modules:
        return None
    module: Any = sys.modules[library]
    if library == "torch":
        return _torch_form(module, value)
    if library == "pandas":
        return _pandas_form(module, value)
    if library == "pyarrow":
        return _arrow_form(module, value)
    python_function = getattr(value, "py_func", None)  # numba: a dispatcher or its kin
    if isinstance(python_function, types.FunctionType):
        options = getattr(value, "targetoptions", None)  # fastmath=, parallel=, …
        return (_name(value), python_function, dict(options) if options else {})
    return None


def compiled_function(func: types.FunctionType) -> object | None:
    """The callable a ``torch.compile`` wrapper compiles, or None for any other function."""
    if "torch" not in sys.modules:
        return None
    return getattr(func, "_torchdynamo_orig_callable", None)


def _name(value: object) -> str:
    return f"{type(value).__module__}.{type(value).__qualname__}"


def _torch_form(torch: Any, value: object) -> tuple[object, ...] | None:
    if isinstance(value, torch.Tensor):
        return _tensor_form(torch, value)
    if isinstance(value, torch.Generator):
        return (_name(value), str(value.device), _tensor_form(torch, value.get_state()))
    original = getattr(value, "_orig_mod", None)  # torch.compile(module)
    if isinstance(value, torch.nn.Module) and isinstance(original, torch.nn.Module):
        return (_name(value), original)
    return None


def _tensor_form(torch: Any, tensor: Any) -> tuple[object, ...]:
    """dtype, device, layout, shape, strides, ``requires_grad`` and the logical bytes."""
    data = tensor.detach()
    if data.layout != torch.strided:  # sparse: by its dense value
        data = data.to_dense()
    shape = (str(tensor.dtype), str(tensor.device.type), str(tensor.layout), tuple(tensor.shape))
    strides = tuple(tensor.stride()) if tensor.layout == torch.strided else ()
    head: tuple[object, ...] = (_name(tensor), *shape, strides, bool(tensor.requires_grad))
    if data.device.type == "meta":  # no data
        return head
    if data.is_quantized:  # its integers and how they map to values
        scheme = data.qscheme()
        if scheme in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            head = (*head, str(scheme), data.q_scale(), data.q_zero_point())
        else:
            scales = (data.q_per_channel_scales(), data.q_per_channel_zero_points())
            head = (*head, str(scheme), data.q_per_channel_axis(), *map(_plain_tensor, scales))
        data = data.int_repr()
    flat = data.resolve_conj().resolve_neg().cpu().contiguous().reshape(-1)
    content = flat.view(torch.uint8).numpy() if flat.numel() else np.zeros(0, np.uint8)
    return (*head, content, getattr(tensor, "__dict__", None) or {})


def _plain_tensor(tensor: Any) -> np.ndarray[Any, Any]:
    return np.asarray(tensor.detach().cpu().contiguous().numpy())


def _pandas_form(pandas: Any, value: object) -> tuple[object, ...] | None:
    extension_array = getattr(getattr(pandas, "api", None), "extensions", None)
    if extension_array is None or not isinstance(value, extension_array.ExtensionArray):
        return None
    array: Any = value
    head = (_name(value), str(array.dtype), len(array))
    ordinals = getattr(array, "asi8", None)  # dates, durations, periods: int64 (NaT included)
    if isinstance(ordinals, np.ndarray):
        return (*head, ordinals)
    codes = getattr(array, "codes", None)
    if isinstance(codes, np.ndarray):  # a Categorical: its codes and categories
        return (*head, codes, np.asarray(array.categories, dtype=object))
    missing = np.asarray(array.isna(), dtype=bool)
    present = array[~missing] if missing.any() else array
    return (*head, missing, np.asarray(present.to_numpy()))


def _arrow_form(pyarrow: Any, value: object) -> tuple[object, ...] | None:
    if isinstance(value, (pyarrow.Table, pyarrow.RecordBatch)):
        schema = value.schema
        fields = tuple(
            (field.name, str(field.type), field.nullable, field.metadata) for field in schema
        )
        columns = tuple(_arrow_column(pyarrow, column) for column in value.columns)
        return (_name(value), fields, schema.metadata, columns)
    if isinstance(value, (pyarrow.ChunkedArray, pyarrow.Array)):
        return (_name(value), _arrow_column(pyarrow, value))
    return None


def _arrow_column(pyarrow: Any, column: Any) -> tuple[object, ...]:
    """A column's logical value, whatever its chunks, offsets or the bytes under its nulls:
    type, null mask, and the values that are not null."""
    array = column.combine_chunks() if isinstance(column, pyarrow.ChunkedArray) else column
    kind = str(array.type)
    if pyarrow.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    missing = array.is_null().to_numpy(zero_copy_only=False)
    present = array.drop_null()
    if pyarrow.types.is_nested(present.type):
        values: object = present.to_pylist()  # exact, where numpy would turn nulls to NaN
    else:
        try:
            values = present.to_numpy(zero_copy_only=False)
        except (NotImplementedError, TypeError, ValueError, pyarrow.ArrowException):
            values = present.to_pylist()
    return (kind, len(array), missing, values)
