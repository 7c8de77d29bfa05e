"""Chat templates for tests, written here in the formats of released models (no hub access):
`QWEN3_TOOLS` renders tools, tool calls and tool results as Qwen3's template does (a `# Tools`
system block with the JSON schemas inside `<tools>`, calls as `<tool_call>` JSON in the
assistant turn, results as `<tool_response>` inside a user turn, and the empty `<think>` block
after the generation prompt when `enable_thinking=False`)."""

QWEN3_TOOLS = (
  "{%- if tools %}"
  "{{- '<|im_start|>system\\n' }}"
  "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
  "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
  "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
  "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
  "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and "
  'arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": '
  '<function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n\' }}'
  "{%- elif messages[0].role == 'system' %}"
  "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
  "{%- endif %}"
  "{%- for message in messages %}"
  "{%- if message.role == 'user' %}"
  "{{- '<|im_start|>user\\n' + message.content + '<|im_end|>\\n' }}"
  "{%- elif message.role == 'assistant' %}"
  "{%- set content = message.content or '' %}"
  "{{- '<|im_start|>assistant\\n' + content }}"
  "{%- for call in message.tool_calls or [] %}"
  "{%- if content or not loop.first %}{{- '\\n' }}{%- endif %}"
  '{{- \'<tool_call>\\n{"name": "\' + call.function.name + \'", "arguments": \' }}'
  "{{- call.function.arguments | tojson }}{{- '}\\n</tool_call>' }}"
  "{%- endfor %}"
  "{{- '<|im_end|>\\n' }}"
  "{%- elif message.role == 'tool' %}"
  "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}"
  "{{- '<|im_start|>user' }}{%- endif %}"
  "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
  "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}"
  "{{- '<|im_end|>\\n' }}{%- endif %}"
  "{%- endif %}"
  "{%- endfor %}"
  "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
  "{%- if enable_thinking is defined and enable_thinking is false %}"
  "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
  "{%- endif %}"
)
