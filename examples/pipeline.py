"""Load a trained model with ``transformers.pipeline`` alone, as with the published dolly-v2 models.

    python examples/pipeline.py [MODEL_DIR]

Every model this project saves carries its pipeline code, so ``trust_remote_code=True`` returns our
``InstructionTextGenerationPipeline``. With no argument it first makes a model as ``examples/generation.py`` does.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from transformers import pipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation import quick_fine_tune  # noqa: E402

from training.logs import configure_logging  # noqa: E402


def main() -> None:
    configure_logging()
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = sys.argv[1] if len(sys.argv) > 1 else quick_fine_tune(str(Path(scratch) / "model"))
        generate_text = pipeline(model=model_dir, trust_remote_code=True, device_map="auto")
        instructions = ["Explain to me what a compiler does.", "Write a haiku about the sea."]
        for instruction, result in zip(instructions, generate_text(instructions, batch_size=2, max_new_tokens=96)):
            print(f"Instruction: {instruction}\n\n{result[0]['generated_text']}\n\n-----------\n")


if __name__ == "__main__":
    main()
