# swiftnbd: build, install and uninstall.
#
#   make                      release build (swift build -c release)
#   make install              install the release binary, systemd units, sysusers.d and
#                             tmpfiles.d entries, firewalld service, man page, example config,
#                             the TLS drop-in (as $(SYSCONFDIR)/swiftnbd/tls.conf, to copy)
#   make uninstall            remove exactly those files
#
# Variables (override on the command line, e.g. `make install PREFIX=/usr DESTDIR=/tmp/pkg`):
#   PREFIX=/usr/local  DESTDIR=  SYSCONFDIR=/etc
#   BINARY=path        install this binary instead of the release build (skips building)
#   SYSTEMDUNITDIR, SYSUSERSDIR, TMPFILESDIR, FIREWALLDSERVICEDIR, MANDIR (defaults below)
#
# The units name the binary as /usr/local/bin/swiftnbd and the configs as /etc/swiftnbd;
# install rewrites both to $(BINDIR) and $(SYSCONFDIR), so the installed units match
# where the binary went. firewalld reads services only from /usr/lib/firewalld/services
# and /etc/firewalld/services, not from under /usr/local: the default is the latter;
# distribution packages set FIREWALLDSERVICEDIR=/usr/lib/firewalld/services.

PREFIX              ?= /usr/local
BINDIR              ?= $(PREFIX)/bin
MANDIR              ?= $(PREFIX)/share/man
SYSCONFDIR          ?= /etc
SYSTEMDUNITDIR      ?= $(PREFIX)/lib/systemd/system
SYSUSERSDIR         ?= $(PREFIX)/lib/sysusers.d
TMPFILESDIR         ?= $(PREFIX)/lib/tmpfiles.d
FIREWALLDSERVICEDIR ?= $(SYSCONFDIR)/firewalld/services
DESTDIR             ?=

SWIFT      ?= swift
SCRATCH    ?= .build
# The Swift runtime is linked in, so the installed binary runs without the toolchain
# (which may live under /home, hidden from the service by ProtectHome=).
SWIFTFLAGS ?= -c release --static-swift-stdlib
RELEASE    := $(SCRATCH)/release/swiftnbd
BINARY     ?= $(RELEASE)

INSTALL  ?= install
UNITS    := swiftnbd@.service swiftnbd.service swiftnbd.socket
# Rewrites the paths the units were written with to the ones installed.
SUBST    := sed -e 's|/usr/local/bin/swiftnbd|$(BINDIR)/swiftnbd|g' \
                -e 's|/etc/swiftnbd|$(SYSCONFDIR)/swiftnbd|g'

.PHONY: all build install uninstall test clean

all: build

build:
	$(SWIFT) build --scratch-path $(SCRATCH) $(SWIFTFLAGS)

# `make build` makes the default BINARY; an overridden BINARY must already exist.
$(RELEASE):
	$(SWIFT) build --scratch-path $(SCRATCH) $(SWIFTFLAGS)

install: $(BINARY)
	$(INSTALL) -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(SYSTEMDUNITDIR) $(DESTDIR)$(SYSUSERSDIR) \
		$(DESTDIR)$(TMPFILESDIR) $(DESTDIR)$(FIREWALLDSERVICEDIR) $(DESTDIR)$(MANDIR)/man1 \
		$(DESTDIR)$(SYSCONFDIR)/swiftnbd
	$(INSTALL) -m 0755 $(BINARY) $(DESTDIR)$(BINDIR)/swiftnbd
	for unit in $(UNITS); do \
		$(SUBST) systemd/$$unit > $(DESTDIR)$(SYSTEMDUNITDIR)/$$unit.tmp && \
		chmod 0644 $(DESTDIR)$(SYSTEMDUNITDIR)/$$unit.tmp && \
		mv $(DESTDIR)$(SYSTEMDUNITDIR)/$$unit.tmp $(DESTDIR)$(SYSTEMDUNITDIR)/$$unit || exit 1; \
	done
	$(INSTALL) -m 0644 systemd/swiftnbd.sysusers $(DESTDIR)$(SYSUSERSDIR)/swiftnbd.conf
	$(INSTALL) -m 0644 systemd/swiftnbd.tmpfiles $(DESTDIR)$(TMPFILESDIR)/swiftnbd.conf
	$(INSTALL) -m 0644 firewall/swiftnbd.xml $(DESTDIR)$(FIREWALLDSERVICEDIR)/swiftnbd.xml
	$(INSTALL) -m 0644 man/swiftnbd.1 $(DESTDIR)$(MANDIR)/man1/swiftnbd.1
	$(INSTALL) -m 0644 systemd/example.conf $(DESTDIR)$(SYSCONFDIR)/swiftnbd/example.conf
	$(SUBST) systemd/tls.conf > $(DESTDIR)$(SYSCONFDIR)/swiftnbd/tls.conf.tmp && \
		chmod 0644 $(DESTDIR)$(SYSCONFDIR)/swiftnbd/tls.conf.tmp && \
		mv $(DESTDIR)$(SYSCONFDIR)/swiftnbd/tls.conf.tmp $(DESTDIR)$(SYSCONFDIR)/swiftnbd/tls.conf
	@if [ -z "$(DESTDIR)" ]; then \
		echo "Next: systemd-sysusers && systemd-tmpfiles --create swiftnbd.conf && systemctl daemon-reload"; \
		echo "      then write $(SYSCONFDIR)/swiftnbd/NAME.conf and systemctl enable --now swiftnbd@NAME"; \
	fi

# Removes the files install put, and the config folder if nothing else is left in it
# (an admin's NAME.conf keeps it). The swiftnbd user and /var/lib/swiftnbd stay.
uninstall:
	rm -f $(DESTDIR)$(BINDIR)/swiftnbd
	for unit in $(UNITS); do rm -f $(DESTDIR)$(SYSTEMDUNITDIR)/$$unit; done
	rm -f $(DESTDIR)$(SYSUSERSDIR)/swiftnbd.conf
	rm -f $(DESTDIR)$(TMPFILESDIR)/swiftnbd.conf
	rm -f $(DESTDIR)$(FIREWALLDSERVICEDIR)/swiftnbd.xml
	rm -f $(DESTDIR)$(MANDIR)/man1/swiftnbd.1
	rm -f $(DESTDIR)$(SYSCONFDIR)/swiftnbd/example.conf
	rm -f $(DESTDIR)$(SYSCONFDIR)/swiftnbd/tls.conf
	rmdir $(DESTDIR)$(SYSCONFDIR)/swiftnbd 2>/dev/null || true

test:
	scripts/test.sh

clean:
	rm -rf $(SCRATCH)/release
