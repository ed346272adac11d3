"""Random-weight code-model checkpoints for the FIM and tool-call tests: a Qwen2-layout model with
Qwen2.5-Coder's FIM, repo and tool-call tokens, and a GLM model with CodeGeeX4's (GLM-4's vocabulary tail,
`[gMASK]<sop>` put before every text), each with a chat template in its family's tool format.

The templates are written here in each family's format (Qwen2.5's `<tool_call>` system prompt and turns,
GLM-4's `<|observation|>` turns and `name\\n{arguments}` calls, Llama 3.1's `<|python_tag|>` / `ipython`);
tests compare fitllm's rendering of them with transformers' on the same messages.
"""

from __future__ import annotations

from pathlib import Path

from conftest import build_random_model

from benchmarks.random_weights import write_byte_tokenizer

QWEN_SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
    "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]  # fmt: skip
QWEN_ADDED = ["<tool_call>", "</tool_call>"]
GLM_SPECIAL = [
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>", "<|assistant|>",
    "<|observation|>", "<|code_prefix|>", "<|code_middle|>", "<|code_suffix|>",
]  # fmt: skip

LLAMA_SPECIAL = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
    "<|python_tag|>",
]  # fmt: skip

QWEN_TEMPLATE = """\
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}{% else %}You are a helpful assistant.{% endif %}


# Tools

You may call one or more functions. Their signatures are within <tools></tools>:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>

Return each call as a JSON object with the function name and arguments within <tool_call></tool_call> tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{% for m in messages %}
{% if m.role == 'user' or (m.role == 'assistant' and not m.tool_calls) %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% elif m.role == 'assistant' %}<|im_start|>assistant
{% if m.content %}{{ m.content }}
{% endif %}
{% for call in m.tool_calls %}<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{% endfor %}<|im_end|>
{% elif m.role == 'tool' %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% endif %}
{% endfor %}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

# GLM-4-9B-chat's form: the tools on a message (`item['tools']`), a call as the assistant's metadata (the
# name) and content (the arguments), results as <|observation|> turns. ([gMASK]<sop>, which GLM-4's template
# starts with, is left to the tokenizer here, which puts it first.)
GLM_TEMPLATE = (
    "{% for item in messages %}{% if item['tools'] is defined %}<|system|>\nYou are a helpful assistant.\n\n"
    "# Available tools{% for tool in item['tools'] %}{% if tool['type'] == 'function' %}\n\n"
    "## {{ tool['function']['name'] }}\n\n{{ tool['function'] | tojson(indent=4) }}\n"
    "Give the arguments of a call to the function above as JSON.{% endif %}{% endfor %}{% endif %}"
    "{% if item['content'] %}<|{{ item['role'] }}|>{{ item['metadata'] }}\n{{ item['content'] }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

LLAMA31_TEMPLATE = """\
<|begin_of_text|>{% if tools %}<|start_header_id|>user<|end_header_id|>

Given the following functions, respond with a JSON for a function call with its proper arguments.
Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.
{% for t in tools %}{{ t | tojson(indent=4) }}

{% endfor %}<|eot_id|>{% endif %}
{% for m in messages %}
{% if m.role == 'assistant' and m.tool_calls %}<|start_header_id|>assistant<|end_header_id|>

{% for call in m.tool_calls %}<|python_tag|>{"name": "{{ call.function.name }}", "parameters": {{ call.function.arguments | tojson }}}{% endfor %}<|eom_id|>
{% elif m.role == 'tool' %}<|start_header_id|>ipython<|end_header_id|>

{{ m.content }}<|eot_id|>
{% else %}<|start_header_id|>{{ m.role }}<|end_header_id|>

{{ m.content }}<|eot_id|>
{% endif %}
{% endfor %}
{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""


def qwen_coder_checkpoint(tmp_path: Path, seed: int = 0) -> Path:
    """A random Qwen2-layout model whose tokenizer has Qwen2.5-Coder's FIM / repo tokens and `<tool_call>`."""
    folder = Path(tmp_path) / f"qwen-coder-{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    vocab = 256 + len(QWEN_SPECIAL) + len(QWEN_ADDED)
    eos = 256 + QWEN_SPECIAL.index("<|endoftext|>")
    model = build_random_model("qwen2", seed=seed, vocab_size=vocab, bos_token_id=eos, eos_token_id=eos)
    model.save_pretrained(folder)
    write_byte_tokenizer(folder, QWEN_SPECIAL, QWEN_ADDED, QWEN_TEMPLATE, eos="<|endoftext|>")
    return folder


def codegeex_checkpoint(tmp_path: Path, seed: int = 0) -> Path:
    """A random GLM model whose tokenizer has CodeGeeX4's special tokens and puts `[gMASK]<sop>` first."""
    folder = Path(tmp_path) / f"codegeex-{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    vocab = 256 + len(GLM_SPECIAL)
    eos = [256 + GLM_SPECIAL.index(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]  # GLM-4's
    model = build_random_model(
        "glm", seed=seed, vocab_size=vocab, bos_token_id=eos[0], eos_token_id=eos, pad_token_id=eos[0]
    )
    model.save_pretrained(folder)
    write_byte_tokenizer(
        folder, GLM_SPECIAL, (), GLM_TEMPLATE, eos="<|endoftext|>", prefix_tokens=["[gMASK]", "<sop>"]
    )
    return folder


def llama31_checkpoint(tmp_path: Path, seed: int = 0) -> Path:
    """A random Llama whose tokenizer has Llama 3.1's header, end-of-turn and `<|python_tag|>` tokens."""
    folder = Path(tmp_path) / f"llama31-{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    vocab = 256 + len(LLAMA_SPECIAL)
    eos = [256 + LLAMA_SPECIAL.index(t) for t in ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>")]
    model = build_random_model("llama", seed=seed, vocab_size=vocab, bos_token_id=256, eos_token_id=eos)
    model.save_pretrained(folder)
    # the template writes <|begin_of_text|> itself, so the tokenizer adds nothing
    write_byte_tokenizer(folder, LLAMA_SPECIAL, (), LLAMA31_TEMPLATE, eos="<|eot_id|>")
    return folder
