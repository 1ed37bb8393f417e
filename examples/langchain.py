"""Our instruction pipeline as a LangChain LLM, with a prompt without and one with context (as Dolly's example did).

    python examples/langchain.py [MODEL_DIR]

With no argument it runs offline on the embedded pretrained model (SmolLM2-135M-Instruct); give a folder that
``train_dolly.py`` or ``training.trainer`` wrote to use a fine-tuned model. Uses ``langchain-huggingface``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

# This file's folder comes off the import path, so that this file never stands in for the `langchain` package.
HERE = Path(__file__).resolve().parent
sys.path[:] = [str(HERE.parent)] + [entry for entry in sys.path if Path(entry or ".").resolve() != HERE]

from langchain_core.prompts import PromptTemplate  # noqa: E402
from langchain_huggingface import HuggingFacePipeline  # noqa: E402

from training.generate import load_model_tokenizer_for_generate  # noqa: E402
from training.logs import configure_logging  # noqa: E402
from training.saved_model.instruct_pipeline import InstructionTextGenerationPipeline  # noqa: E402

CONTEXT = (
    "George Washington (February 22, 1732 - December 14, 1799) was an American military officer, statesman, and "
    "Founding Father who served as the first president of the United States from 1789 to 1797."
)


def instruction_llm(model_dir: str, max_new_tokens: int = 64):
    """The pipeline (greedy, stopping at ``### End``) as a LangChain LLM. ``return_full_text`` puts the prompt
    before the answer and ``skip_prompt`` has LangChain take it off again, as Dolly's example did."""
    model, tokenizer = load_model_tokenizer_for_generate(model_dir)
    pipeline = InstructionTextGenerationPipeline(
        model=model,
        tokenizer=tokenizer,
        task="text-generation",
        return_full_text=True,
        do_sample=False,
        max_new_tokens=max_new_tokens,
    )
    return HuggingFacePipeline(pipeline=pipeline).bind(skip_prompt=True)


def main() -> None:
    configure_logging()
    logging.getLogger().setLevel(logging.WARNING)  # the answers are the output
    if len(sys.argv) > 1:
        model_dir = sys.argv[1]
    else:
        from training.driver.embedded import embedded_model_dir

        model_dir = str(embedded_model_dir())
    llm = instruction_llm(model_dir)
    prompt = PromptTemplate.from_template("{instruction}")
    prompt_with_context = PromptTemplate.from_template("{instruction}\n\nInput:\n{context}")
    chain, context_chain = prompt | llm, prompt_with_context | llm
    answer = chain.invoke({"instruction": "Explain to me the difference between nuclear fission and fusion."})
    print(f"Without context:\n{answer.strip()}\n\n-----------\n")
    answer = context_chain.invoke({"instruction": "When was George Washington president?", "context": CONTEXT})
    print(f"With context:\n{answer.strip()}\n\n-----------\n")


if __name__ == "__main__":
    main()
