"""A conversation as token ids, grown turn by turn so that the history is never tokenized again.

Each user turn adds the chat template's rendering of the new message as the difference from the rendering so far;
each answer adds the ids the model generated, exactly as sampled. A cache that has seen `ids[:n]` continues with
`ids[n:]` (a chunked prefill), so the second turn costs only its own tokens.

With ChatML (SmolLM2) the history after one exchange renders as

    <|im_start|>system\n...<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1

and the next user turn adds `<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n`: the answer's
end-of-message comes with the next turn, since a generation stops on EOS without feeding it back.
"""
from __future__ import annotations

from .errors import TinygenError


class Conversation:
    def __init__(self, tokenizer, system: str | None = None):
        self.tok = tokenizer
        self.system = system
        self.reset()

    def reset(self):
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system is not None else []
        self.ids: list[int] = []  # every token of the conversation so far: prompts and answers
        self.text = ""  # the rendering that `ids` stand for

    def user_turn(self, content: str) -> list[int]:
        """Add a user message; returns its new tokens (the rendering's difference from the history)."""
        messages = self.messages + [{"role": "user", "content": content}]
        rendered = self.tok.render_chat(messages, add_generation_prompt=True)
        if not rendered.startswith(self.text):  # e.g. a template that trims the answers it renders back
            raise TinygenError("this chat template does not render the conversation as an extension of its "
                               "history (does it trim messages?): /reset starts a new one")
        new = self.tok.encode(rendered[len(self.text):])  # as one-shot prompts: the template brings any BOS
        self._before = (self.messages, self.text, len(self.ids))
        self.messages, self.text = messages, rendered
        self.ids += new
        return new

    def assistant_turn(self, answer_ids: list[int]):
        """Add the model's answer: the ids it generated (without the EOS that ended it)."""
        text = self.tok.decode(answer_ids)
        self.messages.append({"role": "assistant", "content": text})
        self.ids += answer_ids
        self.text += text

    def undo_user_turn(self):
        """Take back the last user message and its tokens (a turn that did not fit the context)."""
        self.messages, self.text, n = self._before
        del self.ids[n:]
