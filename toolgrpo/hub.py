"""The one error of the Hugging Face Hub that both sides raise: toolgrpo.envs for a data set,
toolgrpo.learners for a model. It lives here, under neither, because envs and learners never
import each other; it imports nothing.
"""


class HubUnavailableError(ConnectionError):
    """A data set or a model that the Hugging Face Hub cannot give: a hub id that is not in the
    local cache and could not be loaded from the Hub.

    `reason` is one line saying what could not be had; `offline_hint` says what to pass instead
    when offline; str(exc) is both, "{reason}. {offline_hint}". A ConnectionError, as `datasets`
    raises for a Hub it cannot reach (`except ConnectionError` takes it too, among other
    connection errors that have no such fields).
    """

    def __init__(self, reason: str, offline_hint: str):
        super().__init__(f"{reason}. {offline_hint}")
        self.reason, self.offline_hint = reason, offline_hint

    def __reduce__(self):
        return type(self), (self.reason, self.offline_hint)
