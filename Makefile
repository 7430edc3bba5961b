# swiftnbd: build, install and uninstall.
#
#   make                      release build (swift build -c release)
#   make install              install the release binary, systemd units, sysusers.d and
#                             tmpfiles.d entries, firewalld service, man page, bash, zsh and
#                             fish completions, example config, the TLS drop-in (as
#                             $(SYSCONFDIR)/swiftnbd/tls.conf, to copy)
#   make uninstall            remove exactly those files
#   make deb                  build $(SCRATCH)/swiftnbd_VERSION_ARCH.deb from the same files
#                             (needs dpkg-dev; BINARY= packages another build)
#
# Variables (override on the command line, e.g. `make install PREFIX=/usr DESTDIR=/tmp/pkg`):
#   PREFIX=/usr/local  DESTDIR=  SYSCONFDIR=/etc
#   BINARY=path        install this binary instead of the release build (skips building)
#   SYSTEMDUNITDIR, SYSUSERSDIR, TMPFILESDIR, FIREWALLDSERVICEDIR, MANDIR,
#   BASHCOMPDIR, ZSHCOMPDIR, FISHCOMPDIR (defaults below)
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
# Where each shell looks by default under PREFIX (zsh: Debian's package dir is vendor-completions).
BASHCOMPDIR         ?= $(PREFIX)/share/bash-completion/completions
ZSHCOMPDIR          ?= $(PREFIX)/share/zsh/site-functions
FISHCOMPDIR         ?= $(PREFIX)/share/fish/vendor_completions.d
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

.PHONY: all build install uninstall deb test clean

all: build

build:
	$(SWIFT) build --scratch-path $(SCRATCH) $(SWIFTFLAGS)

# `make build` makes the default BINARY; an overridden BINARY must already exist.
$(RELEASE):
	$(SWIFT) build --scratch-path $(SCRATCH) $(SWIFTFLAGS)

install: $(BINARY)
	$(INSTALL) -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(SYSTEMDUNITDIR) $(DESTDIR)$(SYSUSERSDIR) \
		$(DESTDIR)$(TMPFILESDIR) $(DESTDIR)$(FIREWALLDSERVICEDIR) $(DESTDIR)$(MANDIR)/man1 \
		$(DESTDIR)$(SYSCONFDIR)/swiftnbd $(DESTDIR)$(BASHCOMPDIR) $(DESTDIR)$(ZSHCOMPDIR) $(DESTDIR)$(FISHCOMPDIR)
	$(INSTALL) -m 0755 $(BINARY) $(DESTDIR)$(BINDIR)/swiftnbd
	# argument-parser writes the completions from the CLI's own definitions. bash sources
	# its file, so the #! line goes (lintian: bash-completion-with-hashbang).
	$(BINARY) --generate-completion-script bash | sed '1{/^#!/d}' > $(DESTDIR)$(BASHCOMPDIR)/swiftnbd
	$(BINARY) --generate-completion-script zsh > $(DESTDIR)$(ZSHCOMPDIR)/_swiftnbd
	$(BINARY) --generate-completion-script fish > $(DESTDIR)$(FISHCOMPDIR)/swiftnbd.fish
	chmod 0644 $(DESTDIR)$(BASHCOMPDIR)/swiftnbd $(DESTDIR)$(ZSHCOMPDIR)/_swiftnbd $(DESTDIR)$(FISHCOMPDIR)/swiftnbd.fish
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
	rm -f $(DESTDIR)$(BASHCOMPDIR)/swiftnbd $(DESTDIR)$(ZSHCOMPDIR)/_swiftnbd $(DESTDIR)$(FISHCOMPDIR)/swiftnbd.fish
	rm -f $(DESTDIR)$(SYSCONFDIR)/swiftnbd/example.conf
	rm -f $(DESTDIR)$(SYSCONFDIR)/swiftnbd/tls.conf
	rmdir $(DESTDIR)$(SYSCONFDIR)/swiftnbd 2>/dev/null || true

# The .deb: `make install` into a staging root with Debian's paths (units in /lib/systemd/system,
# as bookworm's systemd and lintian expect), then what Debian policy adds: a stripped binary,
# a compressed man page, copyright and changelog, conffiles, maintainer scripts, md5sums.
# dpkg-shlibdeps turns the libraries the binary links into Depends.
VERSION  := $(shell sed -n 's/.*static let version = "\(.*\)".*/\1/p' Sources/SwiftNBDKit/ExportSetup.swift)
DEBARCH  := $(shell dpkg --print-architecture 2>/dev/null)
DEBBUILD := $(SCRATCH)/deb
DEBROOT  := $(DEBBUILD)/root
DEB      := $(SCRATCH)/swiftnbd_$(VERSION)_$(DEBARCH).deb
DOCDIR   := $(DEBROOT)/usr/share/doc/swiftnbd
# xz makes the smallest package; tests pass DEBFLAGS="-Zgzip -z1", much faster on a 60 MB binary.
DEBFLAGS ?= -Zxz
# Extra dpkg-shlibdeps flags, e.g. -l for libraries of a build that is not self-contained.
SHLIBDEPSFLAGS ?=

deb: $(BINARY)
	rm -rf $(DEBBUILD) && mkdir -p $(DEBROOT)/DEBIAN $(DEBBUILD)/debian
	$(MAKE) --no-print-directory install DESTDIR=$(abspath $(DEBROOT)) PREFIX=/usr BINARY=$(BINARY) \
		SYSTEMDUNITDIR=/lib/systemd/system FIREWALLDSERVICEDIR=/usr/lib/firewalld/services \
		ZSHCOMPDIR=/usr/share/zsh/vendor-completions
	strip --strip-unneeded --remove-section=.comment --remove-section=.note $(DEBROOT)/usr/bin/swiftnbd
	gzip -9n $(DEBROOT)/usr/share/man/man1/swiftnbd.1
	$(INSTALL) -d $(DOCDIR)
	$(INSTALL) -m 0644 packaging/deb/copyright $(DOCDIR)/copyright
	gzip -9n < packaging/deb/changelog > $(DOCDIR)/changelog.gz && chmod 0644 $(DOCDIR)/changelog.gz
	$(INSTALL) -m 0755 packaging/deb/postinst $(DEBROOT)/DEBIAN/postinst
	$(INSTALL) -m 0644 packaging/deb/conffiles $(DEBROOT)/DEBIAN/conffiles
	# dpkg-shlibdeps wants a debian/control to exist; it reads nothing it needs from it.
	printf 'Source: swiftnbd\n\nPackage: swiftnbd\nArchitecture: any\n' > $(DEBBUILD)/debian/control
	cd $(DEBBUILD) && dpkg-shlibdeps $(SHLIBDEPSFLAGS) -O root/usr/bin/swiftnbd | sed -n 's/^shlibs:Depends=//p' > depends
	test -s $(DEBBUILD)/depends
	# GnuTLS is loaded with dlopen when TLS is set up, so dpkg-shlibdeps can't see it.
	sed -i 's/$$/, libgnutls30/' $(DEBBUILD)/depends
	sed -e 's|@VERSION@|$(VERSION)|' -e 's|@ARCH@|$(DEBARCH)|' \
		-e "s|@SIZE@|$$(du -sk --exclude=DEBIAN $(DEBROOT) | cut -f1)|" \
		-e "s|@DEPENDS@|$$(cat $(DEBBUILD)/depends)|" packaging/deb/control.in > $(DEBROOT)/DEBIAN/control
	cd $(DEBROOT) && find . -path ./DEBIAN -prune -o -path ./etc -prune -o -type f -printf '%P\0' \
		| sort -z | xargs -0 md5sum > DEBIAN/md5sums
	dpkg-deb $(DEBFLAGS) --root-owner-group --build $(DEBROOT) $(DEB)

test:
	scripts/test.sh

clean:
	rm -rf $(SCRATCH)/release
