"""Chat templates run under a render budget (issue 11): templates that loop, recurse or grow forever are stopped
quickly with a one-line TemplateError, and nothing they print or raise shows heap addresses. Real templates are
unaffected (tests/test_chat.py renders them against transformers)."""
import re
import time

import pytest

from llamba.chat import BUILTIN_TEMPLATES, MAX_STEPS, ChatTemplate
from llamba.errors import LlambaError, TemplateError

MSGS = [{"role": "user", "content": "hi"}]

RUNAWAY = {
    "nested range loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "lipsum": "{{ lipsum(n=10**7) }}",
    "lipsum words": "{{ lipsum(n=100, max=10**9) }}",
    "~ doubling": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                  "{% endfor %}{{ ns.s|length }}",
    "+ doubling": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
                  "{% endfor %}",
    "list doubling": "{% set ns = namespace(s=[1]) %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
                     "{% endfor %}",
    "output flood": "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
    "exponential macro": "{% macro f(n) %}{% if n > 0 %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(60) }}",
    "infinite macro": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "string loops": "{% set s = 'x' * 1000000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",
    "recursive loop": "{% for i in range(10) recursive %}{{ loop(range(100000)) }}{% endfor %}",
    "slow body": "{% set s = 'x' * 1000000 %}{% for i in range(100000) %}{% set y = s|upper %}{% endfor %}",
    "center": "{{ 'x'|center(10**9) }}",
    "ljust": "{{ 'x'.ljust(10**9) }}",
    "percent width": "{{ '%1000000000s' % 1 }}",
    "percent star": "{{ '%*s' % (10**9, 'x') }}",
    "format width": "{{ '{:>1000000000}'.format(1) }}",
    "format precision": "{{ '{:.1000000000f}'.format(1.0) }}",
    "format filter": "{{ '%1000000000d'|format(1) }}",
    "replace": "{{ ('x' * 1000000)|replace('x', 'y' * 100) }}",
    "join": "{{ (['x' * 1000000] * 1000)|join }}",
    "print a shared list": "{{ ['x' * 1000000] * 1000 }}",
    "stringify a shared list": "{{ (['x' * 1000000] * 1000)|upper }}",
    "batch": "{{ range(10)|batch(10**9, 'x')|list }}",
    "slice": "{{ range(10)|slice(10**9)|list }}",
    "to_bytes": "{{ (5).to_bytes(10**9, 'big') }}",
    "indent": "{{ 'x'|indent(10**9, true) }}",
    "int squaring": "{% set ns = namespace(x=3) %}{% for i in range(64) %}{% set ns.x = ns.x * ns.x %}{% endfor %}",
    "sum of lists": "{{ ([[1] * 1000000] * 1000)|sum(start=[]) }}",
    "expandtabs": "{{ ('\t' * 1000).expandtabs(10**7) }}",
    "tojson indent": "{{ messages|tojson(indent=10**6) }}",
    "wordwrap": "{{ ('ab ' * 100000)|wordwrap(1, wrapstring='z' * 1000) }}",
}


@pytest.mark.parametrize("name", list(RUNAWAY))
def test_runaway_templates_are_stopped_quickly(name):
    t = ChatTemplate(RUNAWAY[name], name="evil")
    t0 = time.perf_counter()
    with pytest.raises(TemplateError) as e:
        t.render(MSGS)
    dt = time.perf_counter() - t0
    msg = str(e.value)
    assert dt < 5, f"{name}: stopped after {dt:.1f} s"
    assert isinstance(e.value, LlambaError) and msg.startswith("chat template") and "\n" not in msg
    assert len(msg) < 400


def test_output_and_value_caps_cost_little_cpu():
    for src in (RUNAWAY["output flood"], RUNAWAY["~ doubling"], RUNAWAY["lipsum"], RUNAWAY["join"]):
        c0 = time.process_time()
        with pytest.raises(TemplateError):
            ChatTemplate(src).render(MSGS)
        assert time.process_time() - c0 < 1.0, src


def test_step_budget_message_names_the_limit():
    with pytest.raises(TemplateError, match=f"more than {MAX_STEPS} steps"):
        ChatTemplate(RUNAWAY["nested range loops"], name="evil").render(MSGS)


def test_a_stopped_render_leaves_the_next_one_unaffected():
    good = ChatTemplate(BUILTIN_TEMPLATES["chatml"][0])
    expected = good.render(MSGS)
    for src in RUNAWAY.values():
        with pytest.raises(TemplateError):
            ChatTemplate(src).render(MSGS)
        assert good.render(MSGS) == expected


def test_big_conversations_still_render():
    """The budget scales with the input: a long conversation with long messages renders in full."""
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} " + "w" * 2000}
            for i in range(3000)]  # 6 MB of text, 3,000 turns
    out = ChatTemplate(BUILTIN_TEMPLATES["chatml"][0]).render(msgs)
    assert out.count("<|im_start|>") == 3001 and len(out) > 6_000_000


ADDRESS_LEAKS = [
    "{{ raise_exception|string }}", "{{ raise_exception }}", "{{ cycler(1, 2) }}", "{{ joiner() }}",
    "{{ namespace }}", "{{ namespace(a=1) }}", "{{ dict }}", "{{ lipsum }}", "{{ range }}", "{{ strftime_now }}",
    "{{ 'a'.upper }}", "{{ messages[0].get }}", "{{ messages[0]['content'].format }}", "{{ [1, 2]|reverse }}",
    "{{ [1, 2]|map('string') }}", "{{ messages|selectattr('role') }}", "{{ dict.fromkeys }}",
    "{% for x in [1] %}{{ loop.cycle }}{{ loop }}{% endfor %}", "{% block b %}x{% endblock %}{{ self.b }}",
    "{{ (raise_exception|string) ~ (cycler(1)|string) ~ ('a'.upper|string) }}",
    "{{ '%s %r' % (raise_exception, cycler(1)) }}", "{{ '{} {!r}'.format(joiner(), 'a'.upper) }}",
    "{{ [raise_exception, 'a'.upper]|join(',') }}", "{{ [raise_exception]|pprint }}",
    "{{ {'f': 'a'.upper} }}", "{% macro m() %}{% endmacro %}{{ m }}{{ caller }}",
]


@pytest.mark.parametrize("src", ADDRESS_LEAKS)
def test_no_heap_addresses_in_rendered_output(src):
    out = ChatTemplate(src).render(MSGS)
    assert not re.search(r"0x[0-9a-fA-F]{6,}", out), out


@pytest.mark.parametrize("src", [
    "{{ raise_exception(cycler(1)) }}", "{{ raise_exception('a'.upper) }}", "{{ raise_exception([joiner()]) }}",
    "{{ cycler(1) + 1 }}", "{{ 'a'.upper + 1 }}", "{{ joiner()(1) }}", "{{ ('a'.upper)(1, 2, 3) }}",
    "{{ range(1, 2, 0) }}", "{{ [1]|sum(start='a'.upper) }}", "{{ raise_exception('x' * 100000) }}",
])
def test_no_heap_addresses_in_errors(src):
    with pytest.raises(TemplateError) as e:
        ChatTemplate(src).render(MSGS)
    msg = str(e.value)
    assert not re.search(r"0x[0-9a-fA-F]{6,}", msg) and "\n" not in msg and len(msg) < 400, msg


def test_template_features_still_work_under_the_budget():
    src = ("{%- set ns = namespace(n=0) -%}{%- for m in messages -%}{%- set ns.n = ns.n + 1 -%}"
           "{{ loop.index }}:{{ m.role|upper }}:{{ m.content|tojson }}:{{ '%-3s|' % m.role[:2] }}"
           "{{ '{:>4}'.format(loop.length) }}{{ cycler('a', 'b').next() }}{% endfor %}"
           "{{ ns.n }}{{ range(3)|join(',') }}{{ lipsum(1, false, 2, 3)|length > 0 }}"
           "{{ [3, 1, 2]|sort|list }}{{ (['a'] * 3)|join('-') }}{{ 'x' ~ 1 ~ [1] }}")
    out = ChatTemplate(src).render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    assert out == ('1:USER:"hi":us |   2a2:ASSISTANT:"yo":as |   2a20,1,2True[1, 2, 3]a-a-ax1[1]')
