"""The gRPC servicer: proto in, lifecycle manager, proto out. No Spawner logic here.

The calling hub's identity and the mapping of errors to statuses are the interceptor's
(see interceptors.py); every method reads the identity with :func:`current_hub`.
"""

from __future__ import annotations

from outpost_client.v1 import outpost_pb2 as pb
from outpost_client.v1 import outpost_pb2_grpc as pb_grpc

from . import convert, validation
from .interceptors import current_hub
from .manager import LifecycleManager


class OutpostServicer(pb_grpc.OutpostServiceServicer):
    def __init__(
        self,
        manager: LifecycleManager,
        *,
        max_struct_depth: int,
        max_auth_state_bytes: int = convert.MAX_AUTH_STATE_BYTES,
    ):
        self.manager = manager
        self.max_struct_depth = max_struct_depth
        self.max_auth_state_bytes = max_auth_state_bytes

    async def Start(self, request: pb.StartRequest, context) -> pb.StartResponse:
        spec = convert.start_spec_from_request(
            request, max_depth=self.max_struct_depth, max_auth_state_bytes=self.max_auth_state_bytes
        )
        status, created = await self.manager.start(current_hub(), spec)
        return pb.StartResponse(status=status, created=created)

    async def Events(self, request: pb.EventsRequest, context):
        validation.check_server_name(request.server_name)
        validation.check_start_id(request.start_id, required=False)
        async for event in self.manager.events(
            current_hub(), request.server_name, request.start_id, request.after_sequence
        ):
            yield event

    async def Poll(self, request: pb.PollRequest, context) -> pb.PollResponse:
        validation.check_server_name(request.server_name)
        return pb.PollResponse(status=self.manager.poll(current_hub(), request.server_name))

    async def Stop(self, request: pb.StopRequest, context) -> pb.StopResponse:
        validation.check_server_name(request.server_name)
        validation.check_start_id(request.start_id, required=False)
        outcome, current = await self.manager.stop(
            current_hub(), request.server_name, request.start_id
        )
        return pb.StopResponse(outcome=outcome, current=current)

    async def BatchPoll(self, request: pb.BatchPollRequest, context) -> pb.BatchPollResponse:
        names = request.server_names
        if not names or len(names) > validation.MAX_BATCH:
            raise validation.invalid(
                "server_names", f"must hold 1 to {validation.MAX_BATCH} names, not {len(names)}"
            )
        for index, name in enumerate(names):
            validation.check_server_name(name, field=f"server_names[{index}]")
        statuses, not_found = self.manager.batch_poll(current_hub(), names)
        return pb.BatchPollResponse(statuses=statuses, not_found=not_found)

    async def ListServers(self, request: pb.ListServersRequest, context) -> pb.ListServersResponse:
        size = validation.check_page_size(request.page_size)
        after = convert.decode_page_token(request.page_token)
        servers, token = self.manager.list(current_hub(), size, after)
        return pb.ListServersResponse(servers=servers, next_page_token=token)

    async def ListFlavors(self, request: pb.ListFlavorsRequest, context) -> pb.ListFlavorsResponse:
        if not request.HasField("user"):
            raise validation.invalid("user", "is required (at least user.name)")
        user = convert.user_from_request(request.user)
        return self.manager.list_flavors(current_hub(), user)
