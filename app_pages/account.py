"""My account: roles, password change, sign out."""
from retina_core.clinic import auth_ui

auth_ui.account_page()
