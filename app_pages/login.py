"""Sign in (the only page of a signed-out session), or the first account of a new install."""
from retina_core.webapp import auth

auth.login_page()
