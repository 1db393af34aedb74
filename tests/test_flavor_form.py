"""The spawn form OutpostSpawner makes from its Outposts' flavors (outpost_client/form.py),
options_from_form, and the chosen flavor travelling as Start's own field.

The Outposts here are small grpc.aio servers that answer ListFlavors from a table and
record Starts (:class:`FlavorOutpost`): the form's tests need flavors with usage in every
state, not a site's admission. tests/test_browser_flavors.py shows the form of real
Outposts in a real browser."""

from __future__ import annotations

import html.parser

import grpc
import pytest
from tornado import web

from outpost_client import errors
from outpost_client.errors import FlavorLimitReached
from outpost_client.form import SystemChoice, duration, options_from_form, render_form, usage
from outpost_client.registry import REGISTRY
from outpost_client.spawner import OutpostStartFailed
from outpost_client.v1 import outpost_pb2 as pb
from outpost_client.v1 import outpost_pb2_grpc as pb_grpc
from outpost_server.interceptors import abort

from .harness.hub import make_spawner

pytestmark = pytest.mark.rpc


def flavor(name, **kw) -> pb.Flavor:
    kw.setdefault("display_name", name.title())
    kw.setdefault("available", True)
    return pb.Flavor(name=name, **kw)


SMALL = flavor("small", description="2 CPU, 4 GB", max_total=8, in_use_total=3, max_runtime_seconds=8 * 3600)
GPU = flavor(
    "gpu", display_name="GPU: 1 A100", max_total=2, in_use_total=2, max_runtime_seconds=7200,
    available=False, unavailable_reason="All 2 are in use.",
)  # fmt: skip


class FlavorOutpost(pb_grpc.OutpostServiceServicer):
    """An Outpost that only lists flavors (from ``answer``) and records Starts; a Start
    of a flavor in ``full`` is refused FLAVOR_LIMIT_REACHED with the Outpost's sentence."""

    def __init__(self, answer: pb.ListFlavorsResponse | None, full: tuple[str, ...] = ()):
        self.answer = answer
        self.full = full
        self.asked: list[pb.ListFlavorsRequest] = []
        self.starts: list[pb.StartRequest] = []

    async def ListFlavors(self, request, context):
        self.asked.append(request)
        if self.answer is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
        return self.answer

    async def Start(self, request, context):
        self.starts.append(request)
        if request.flavor in self.full:
            await abort(context, FlavorLimitReached(
                f"All 2 servers of flavor {request.flavor} are in use; try again when one stops.",
                metadata={"flavor": request.flavor, "limit": "total", "max": "2", "in_use": "2"},
            ))  # fmt: skip
        await abort(context, errors.ShuttingDown("not in this test"))


@pytest.fixture
async def fake_outposts():
    servers, made = [], []

    async def factory(answer, full=()):
        servicer = FlavorOutpost(answer, full)
        server = grpc.aio.server()
        pb_grpc.add_OutpostServiceServicer_to_server(servicer, server)
        servicer.address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        await server.start()
        servers.append(server)
        made.append(servicer)
        return servicer

    yield factory
    await REGISTRY.close_all()
    for server in servers:
        await server.stop(0)


class Inputs(html.parser.HTMLParser):
    """The form's radio inputs, as a browser parses them."""

    def __init__(self, text: str):
        super().__init__()
        self.radios: dict[str, dict] = {}
        self.hidden: dict[str, str] = {}
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "input" and a.get("type") == "radio":
            self.radios[a["value"]] = a
        elif tag == "input" and a.get("type") == "hidden":
            self.hidden[a["name"]] = a["value"]


# --- the pure builders ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "seconds, text",
    [(30, "30 s"), (60, "1 min"), (2700, "45 min"), (8 * 3600, "8 h"), (5400, "1 h 30 min"), (86400 + 4 * 3600, "1 d 4 h")],
)
def test_runtimes_read_as_a_person_says_them(seconds, text):
    assert duration(seconds) == text


def test_usage_names_each_limit_there_is():
    assert usage(SMALL) == "3 of 8 in use"
    assert usage(flavor("x", in_use_total=5)) == "5 in use"
    both = flavor("x", max_total=8, in_use_total=3, max_per_hub=4, in_use_hub=1, max_per_user=1, in_use_user=0)
    assert usage(both) == "3 of 8 in use · this hub: 1 of 4 · yours: 0 of 1"


def test_form_shows_systems_flavors_usage_runtime_and_why_one_is_disabled():
    systems = [
        SystemChoice("default", "HPC cluster", flavors=[SMALL, GPU], default_flavor="small", user_max_total=3, user_in_use_total=1),
        SystemChoice("cloud", "Cloud"),
        SystemChoice("down", "Down", error="This system cannot be reached now; try again later."),
    ]
    text = render_form(systems, "default/small")
    inputs = Inputs(text)
    assert inputs.hidden == {"outpost_form": "1"}
    assert set(inputs.radios) == {"default/small", "default/gpu", "cloud/"}
    assert "checked" in inputs.radios["default/small"] and "disabled" not in inputs.radios["default/small"]
    assert "disabled" in inputs.radios["default/gpu"] and "checked" not in inputs.radios["default/gpu"]
    for words in ("HPC cluster", "Small", "2 CPU, 4 GB", "3 of 8 in use", "up to 8 h", "GPU: 1 A100",
                  "2 of 2 in use", "up to 2 h", "All 2 are in use.", "You have 1 of at most 3 servers here.",
                  "Cloud", "This system cannot be reached now"):  # fmt: skip
        assert words in text, words


def test_everything_an_outpost_names_is_escaped():
    evil = '<script>alert(1)</script>"><img src=x onerror=alert(2)>'
    systems = [
        SystemChoice(
            'a"b', evil,
            flavors=[flavor("x", display_name=evil, description=evil, available=False, unavailable_reason=evil)],
        ),
        SystemChoice("c", evil, error=evil),
    ]  # fmt: skip
    text = render_form(systems)
    assert "<script" not in text and "<img" not in text and 'onerror=alert(2)>' not in text.replace("&gt;", "")
    inputs = Inputs(text)
    assert set(inputs.radios) == {'a"b/x'}  # the value reads back as it was, nothing more
    assert inputs.radios['a"b/x']["id"] == "outpost-choice-0-0"


def test_options_from_form():
    names = ["default", "gpu"]
    assert options_from_form({"outpost_form": ["1"], "outpost_flavor": ["gpu/a100"]}, names) == {
        "outpost": "gpu", "flavor": "a100",
    }  # fmt: skip
    assert options_from_form({"outpost_form": ["1"], "outpost_flavor": ["default/"]}, names) == {"outpost": "default"}
    # a site's own form (no marker): as JupyterHub passes it through by default
    assert options_from_form({"image": ["x"]}, names) == {"image": ["x"]}


@pytest.mark.parametrize(
    "data, message",
    [
        ({}, "Choose one of the offered systems"),
        ({"outpost_flavor": ["default/a", "gpu/b"]}, "Choose one of the offered systems"),
        ({"outpost_flavor": ["elsewhere/a"]}, "That system is not offered here"),
        ({"outpost_flavor": ["nothing"]}, "That system is not offered here"),
        ({"outpost_flavor": ["gpu/../../x"]}, "That system is not offered here"),
        ({"outpost_flavor": ["gpu/<b>"]}, "That flavor is not offered here"),
        ({"outpost_flavor": ["gpu/" + "a" * 65]}, "That flavor is not offered here"),
    ],
)
def test_options_from_form_refuses_what_the_form_never_offered(data, message):
    with pytest.raises(web.HTTPError) as e:
        options_from_form({"outpost_form": ["1"], **data}, ["default", "gpu"])
    assert e.value.status_code == 400 and e.value.jupyterhub_message.startswith(message)


# --- OutpostSpawner's form, asked of the Outposts each time it is shown ---------------------------


async def test_the_form_lists_each_outposts_flavors_as_the_user_may_use_them(fake_outposts):
    a = await fake_outposts(pb.ListFlavorsResponse(flavors=[SMALL, GPU], default_flavor="small"))
    b = await fake_outposts(pb.ListFlavorsResponse())
    spawner = make_spawner(
        a, outposts={"cloud": {"address": b.address}}, outpost_display_names={"default": "HPC cluster"},
    )  # fmt: skip
    spawner.user.admin = True
    text = await spawner.get_options_form()
    inputs = Inputs(text)
    assert set(inputs.radios) == {"default/small", "default/gpu", "cloud/"}
    assert "checked" in inputs.radios["default/small"]
    assert "HPC cluster" in text and "3 of 8 in use" in text and "All 2 are in use." in text
    (asked,) = a.asked
    assert asked.user.name == "alice" and asked.user.admin

    # asked again each time the form is shown: the usage is live
    a.answer = pb.ListFlavorsResponse(flavors=[flavor("small", max_total=8, in_use_total=4)])
    assert "4 of 8 in use" in await spawner.get_options_form()
    assert len(a.asked) == 2 and len(b.asked) == 2

    options = spawner.run_options_from_form({"outpost_form": ["1"], "outpost_flavor": ["cloud/"]})
    assert options == {"outpost": "cloud"}


async def test_previous_choice_is_checked_if_it_can_start(fake_outposts):
    a = await fake_outposts(pb.ListFlavorsResponse(flavors=[SMALL, flavor("big")], default_flavor="small"))
    spawner = make_spawner(a)
    spawner.user_options = {"outpost": "default", "flavor": "big"}
    assert "checked" in Inputs(await spawner.get_options_form()).radios["default/big"]
    spawner.user_options = {"outpost": "default", "flavor": "gone"}
    assert "checked" in Inputs(await spawner.get_options_form()).radios["default/small"]


async def test_one_outpost_without_flavors_shows_no_form(fake_outposts):
    a = await fake_outposts(pb.ListFlavorsResponse())
    assert await make_spawner(a).get_options_form() == ""
    old = await fake_outposts(None)  # an Outpost from before flavors: UNIMPLEMENTED
    assert await make_spawner(old).get_options_form() == ""


async def test_an_unreachable_outpost_is_shown_as_such_and_the_others_still_offered(fake_outposts):
    a = await fake_outposts(pb.ListFlavorsResponse(flavors=[SMALL]))
    spawner = make_spawner(a, outposts={"down": {"address": "127.0.0.1:1"}}, form_timeout=2)
    text = await spawner.get_options_form()
    assert set(Inputs(text).radios) == {"default/small"}
    assert "This system cannot be reached now; try again later." in text
    assert "127.0.0.1:1" not in text  # the hub's addresses are not the user's business


async def test_a_site_form_is_kept_and_the_form_can_be_turned_off(fake_outposts):
    a = await fake_outposts(pb.ListFlavorsResponse(flavors=[SMALL]))
    own = make_spawner(a, options_form="<input name='image'>")
    assert await own.get_options_form() == "<input name='image'>"
    assert own.run_options_from_form({"image": ["x"]}) == {"image": ["x"]}
    assert await make_spawner(a, options_form="").get_options_form() == ""
    assert not a.asked


async def test_form_outposts_and_named_servers_choose_what_is_offered(fake_outposts):
    a = await fake_outposts(pb.ListFlavorsResponse(flavors=[SMALL]))
    b = await fake_outposts(pb.ListFlavorsResponse(flavors=[GPU]))
    outposts = {"gpu": {"address": b.address}}
    only_gpu = make_spawner(a, outposts=outposts, form_outposts=["gpu"])
    assert set(Inputs(await only_gpu.get_options_form()).radios) == {"gpu/gpu"}
    with pytest.raises(web.HTTPError):
        only_gpu.run_options_from_form({"outpost_form": ["1"], "outpost_flavor": ["default/small"]})
    named = make_spawner(a, name="gpu", outposts=outposts)
    assert set(Inputs(await named.get_options_form()).radios) == {"gpu/gpu"}


async def test_the_flavor_travels_as_starts_field_and_a_refusal_is_the_users_sentence(fake_outposts):
    a = await fake_outposts(pb.ListFlavorsResponse(flavors=[GPU]), full=("gpu",))
    spawner = make_spawner(a)
    spawner.user_options = spawner.run_options_from_form({"outpost_form": ["1"], "outpost_flavor": ["default/gpu"]})
    with pytest.raises(OutpostStartFailed) as e:
        await spawner.start()
    assert str(e.value) == "All 2 servers of flavor gpu are in use; try again when one stops."
    (start,) = a.starts
    assert start.flavor == "gpu"
    assert "flavor" not in start.user_options and "outpost" not in start.user_options


async def test_a_malformed_flavor_in_user_options_is_refused_before_anything_is_sent(fake_outposts):
    a = await fake_outposts(pb.ListFlavorsResponse(flavors=[GPU]))
    spawner = make_spawner(a)
    spawner.user_options = {"flavor": ["gpu"]}
    with pytest.raises(web.HTTPError) as e:
        await spawner.start()
    assert e.value.status_code == 400
    assert not a.starts and not spawner.start_id  # nothing to poll or stop
