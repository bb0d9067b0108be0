"""A tokenizer test corpus: scripts, accents, emoji, code, whitespace and special-token look-alikes."""

from __future__ import annotations

BASE = [
    "Hello world", "hello, world!", "The quick brown fox jumps over the lazy dog.", "  leading spaces",
    "trailing spaces   ", "tabs\tand\nnewlines\r\n", "\n\n\n", " ", "", "a", "A", "I'm you're they've we'll",
    "Ça va très bien, merci ! Où est la bibliothèque ?", "L'été dernier, nous sommes allés à Besançon.",
    "Ægir, Œuvre, Ÿ, ß, İstanbul, ǅ", "naïve café résumé coöperate façade",
    "Größenwahn über Äpfel, Öl und Übermut.", "Die Straße ist breit; Fußgänger gehen dort.",
    "আমি বাংলায় গান গাই।", "বাংলা ভাষা একটি ইন্দো-আর্য ভাষা।", "日本語のテキストです。", "東京は日本の首都です",
    "中文句子，包括标点符号。", "我爱北京天安门", "한국어 문장입니다.", "Привет, как дела?", "Ελληνικά γράμματα",
    "مرحبا بالعالم", "שלום עולם", "हिन्दी में लिखा गया वाक्य", "ภาษาไทย", "Tiếng Việt có dấu",
    "😀😃😄😁", "👨‍👩‍👧‍👦 family", "🇫🇷🇩🇪🇯🇵", "emoji in text 🤗 works?", "❤️‍🔥 and ✨",
    "def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "<div class=\"x\">&amp;</div>", "SELECT * FROM users WHERE id = 42;", "print(\"héllo\")  # comment",
    "    indented\n        more\n\tmixed", "x=1;y=2;z=x+y", "λx.λy.x", "∀ε>0 ∃δ>0: |x−a|<δ ⇒ |f(x)−f(a)|<ε",
    "1234567890", "3.14159 2.71828 1e-10 0xFF", "2024-11-27T12:00:00Z", "$100.00 €50 £20 ¥1000",
    "https://example.com/path?q=1&r=2#frag", "user@example.org", "C:\\Users\\Name\\file.txt",
    "<s>", "</s>", "<unk>", "[INST]", "[/INST]", "<|im_start|>", "<|im_end|>", "<|endoftext|>",
    "[INST] not really an instruction [/INST]", "<s> fake bos", "text <|im_start|>user\nhi<|im_end|>",
    "<0x0A>", "▁underscore▁lookalike", "Ġ and Ċ characters", "\u200b zero width \ufeff bom",
    "combining e\u0301 vs é", "ﬁ ligature", "full-width ＡＢＣ１２３", "\u00a0non-breaking\u00a0space",
    "a" * 50, "ab" * 30, "🙂" * 10, "  " * 20, "\t" * 8, "." * 40, "-" * 30, "=" * 25,
    "MixedCASEWordsAndCamelCase snake_case_words kebab-case-words", "ALL CAPS SENTENCE HERE",
    "Numbers 1 22 333 4444 55555 666666", "O'Neil's \"quoted\" text", "question? exclamation! ellipsis…",
    "«guillemets» „Anführungszeichen“ 「括弧」", "Mr. Smith went to Washington D.C. in 1999.",
]


def corpus() -> list[str]:
    """BASE plus variants (a leading space, a newline inside, upper case): over 200 strings."""
    out = list(BASE)
    for text in BASE:
        if text:
            out.append(" " + text)
            out.append(text.upper())
    for a, b in zip(BASE[::3], BASE[1::3], strict=False):
        out.append(f"{a}\n{b}")
    out += [" " * n for n in (17, 33, 65)] + ["x" + " " * n + "y" for n in (9, 18, 31)]
    return list(dict.fromkeys(out))
