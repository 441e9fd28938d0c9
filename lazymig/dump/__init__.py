"""Dump side: freezing, scanning, page pipes and the page server."""
