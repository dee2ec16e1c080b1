"""Sign in (the only page of a signed-out session), or the first account of a new install."""
from retina_core.clinic import auth_ui

auth_ui.login_page()
