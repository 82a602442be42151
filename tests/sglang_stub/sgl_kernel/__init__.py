"""FAKE sgl_kernel, for tests only: a stand-in for SGLang's CUDA kernel package, which cannot be installed
on a machine without a GPU. SGLang imports it at start-up even on its CPU path; nothing on that path
should call into it. Every attribute, of this module and of any `sgl_kernel.*` submodule, is a stub that
raises if called, so a test that passes never ran a fake kernel.

Only the SGLang server's PYTHONPATH gets this folder (see tests/conftest.py), never the test process's.
"""
import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0+fake"


class FakeKernelCalled(NotImplementedError):
    pass


class _Stub:
    def __init__(self, name: str):
        self._name = name

    def __call__(self, *args, **kwargs):
        raise FakeKernelCalled(f"{self._name} is part of the FAKE sgl_kernel (tests/sglang_stub) and was called")

    def __getattr__(self, item: str):
        return _Stub(f"{self._name}.{item}")


class _StubModule(types.ModuleType):
    def __getattr__(self, item: str):
        if item.startswith("__"):
            raise AttributeError(item)
        return _Stub(f"{self.__name__}.{item}")


class _SubmoduleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.startswith(__name__ + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _SubmoduleFinder())
sys.modules[__name__].__class__ = _StubModule
