#!/bin/sh
# GET /: busybox httpd runs this for a directory without index.html.
exec /www/cgi-bin/slow
