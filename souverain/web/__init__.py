"""The chat app: static assets, sign-in sessions and conversation storage, served by the API's process."""
