"""`HFDirWriter`: an engine-shaped sink whose `update_weights` writes the pushed weights as an HF checkpoint.
The trainer's final export uses it, and so does the engine's starting directory when the student is a
converted Megatron checkpoint."""
from checkpoint_tools.hf_files import write_hf_dir


class HFDirWriter:
    def __init__(self, out_dir: str, metadata_dir: str):
        self.out_dir, self.metadata_dir = out_dir, metadata_dir

    def update_weights(self, named_tensors, version: int) -> None:
        write_hf_dir(named_tensors, self.out_dir, self.metadata_dir)
