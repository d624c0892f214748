"""Copier LoRA for the AUTOMATIC1111 WebUI: registers the extension's callbacks, nothing else.

The code lives in `lib_copier` (see lib_copier/webui/extension.py).
"""

from modules import script_callbacks

from lib_copier.webui import extension

script_callbacks.on_app_started(extension.on_app_started)
script_callbacks.on_ui_settings(extension.on_ui_settings)
script_callbacks.on_ui_tabs(extension.on_ui_tabs)
script_callbacks.on_after_component(extension.on_after_component)
script_callbacks.on_before_reload(extension.on_before_reload)
