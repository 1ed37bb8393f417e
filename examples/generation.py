"""Answer instructions with a trained model through ``generate_response``.

    python examples/generation.py [MODEL_DIR]

With no argument it fine-tunes the embedded 135M pretrained model on the project's sample data for a few steps
(offline, on CPU, about a minute), then answers with it. Pass the output folder of a real run to use that instead.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from training.driver.embedded import embedded_model_dir
from training.generate import generate_response, load_model_tokenizer_for_generate
from training.logs import configure_logging
from training.trainer import train

SAMPLE_DATA = Path(__file__).resolve().parent.parent / "data" / "dolly_sample.jsonl"


def quick_fine_tune(output_dir: str) -> str:
    """A short offline fine-tune of the embedded model on the sample data, enough to learn the Dolly format."""
    return str(
        train(
            input_model=str(embedded_model_dir()),
            local_output_dir=output_dir,
            training_dataset=str(SAMPLE_DATA),
            epochs=2,
            per_device_train_batch_size=4,
            test_size=0,
            lr=1e-4,
            warmup_steps=2,
            save_steps=1000,
            logging_steps=5,
            max_length=512,
        )
    )


def main() -> None:
    configure_logging()
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = sys.argv[1] if len(sys.argv) > 1 else quick_fine_tune(str(Path(scratch) / "model"))
        model, tokenizer = load_model_tokenizer_for_generate(model_dir)
        for instruction in ["What is photosynthesis?", "Give me three ideas for a rainy day indoors."]:
            response = generate_response(
                instruction, model=model, tokenizer=tokenizer, do_sample=False, max_new_tokens=96
            )
            print(f"Instruction: {instruction}\n\n{response}\n\n-----------\n")
        context = {"instruction": "When was the bridge opened?", "context": "The bridge was opened in May 1932."}
        print(generate_response(context, model=model, tokenizer=tokenizer, do_sample=False, max_new_tokens=32))


if __name__ == "__main__":
    main()
