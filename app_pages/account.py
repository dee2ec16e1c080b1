"""My account: roles, password change, sign out."""
from retina_core.webapp import auth

auth.account_page()
