# imgbox - one non-recursive Makefile.
#   make                 static musl release binary ./imgbox (configs/defconfig)
#   make san             glibc build with ASan+UBSan: $(SANBUILD)/imgbox
#   make tsan            glibc build with ThreadSanitizer: $(TSANBUILD)/imgbox
#   make check           unit + applet tests against both builds, TSan stress,
#                        every fuzz target for FUZZ_TIME s (20)
#   make tsan-check      only the TSan stress (tests/tsan.sh)
#   make defconfig | tiny_defconfig | oldconfig | menuconfig
#   make size            binary size of each shipped configuration
#   make demo            the main job on a small generated image
#   make bench           convert benchmark against qemu-img
#   make fuzz            libFuzzer targets (clang)
#   make fuzz-smoke      ... and a short run of each
#   make install         binary, applet links, imgbox.1, initramfs-tools hook
#                        and dracut module under $(DESTDIR)$(PREFIX)
#   make uninstall       removes what install put there
#   make clean | distclean

CONFIG  ?= .config
GEN     ?= include/generated
OUT     ?= imgbox
BUILD   ?= build/release
DEPS    := build/deps
MUSL_CC ?= musl-gcc
SAN_CC  ?= gcc
SANBUILD ?= build/san
TSAN_CC ?= gcc
TSANBUILD ?= build/tsan
KCONF   := kconfig-conf
export KCONFIG_CONFIG := $(CONFIG)

WARN    := -Wall -Wextra -Wno-unused-parameter -Wshadow -Wstrict-prototypes
CFLAGS_COMMON := -std=gnu11 $(WARN) -D_GNU_SOURCE -pthread \
	-I$(dir $(GEN)) -Iinclude -MMD -MP
REL_CFLAGS := $(CFLAGS_COMMON) -Os -ffunction-sections -fdata-sections \
	-fno-asynchronous-unwind-tables -fno-unwind-tables -fno-stack-protector \
	-I$(DEPS)/musl/include
# Code and read-only data share one segment (-z noseparate-code): 4 KiB of
# page padding less. LTO was measured too (376 bytes less text, the same
# file size after page alignment) and is not used.
REL_LDFLAGS := -static -Wl,--gc-sections -Wl,-z,noseparate-code -s \
	-L$(DEPS)/musl/lib
SAN_CFLAGS := $(CFLAGS_COMMON) -O1 -g -Werror -fsanitize=address,undefined \
	-fno-omit-frame-pointer -fno-sanitize-recover=undefined
SAN_LDFLAGS := -fsanitize=address,undefined
TSAN_CFLAGS := $(CFLAGS_COMMON) -O1 -g -Werror -fsanitize=thread \
	-fno-omit-frame-pointer
TSAN_LDFLAGS := -fsanitize=thread
LIBS := -lz -laio -lpthread

all: $(OUT)

# ---- configuration ----
KSRC := $(wildcard applets/*.c formats/*.c formats/*/*.c)
include/generated/Config.applets.in include/generated/Config.formats.in: \
		$(KSRC) kconfig/gen.sh
	@sh kconfig/gen.sh kconfig

DEFCONFIG ?= configs/defconfig
$(CONFIG): | include/generated/Config.applets.in
	@mkdir -p $(dir $(CONFIG))
	@$(KCONF) --defconfig=$(DEFCONFIG) Kconfig >/dev/null

$(GEN)/objs.mk: $(CONFIG) $(KSRC) kconfig/gen.sh Kconfig \
		include/generated/Config.applets.in
	@sh kconfig/gen.sh kconfig
	@$(KCONF) --olddefconfig Kconfig >/dev/null
	@sh kconfig/gen.sh headers $(CONFIG) $(GEN)

-include $(GEN)/objs.mk

defconfig: include/generated/Config.applets.in
	$(KCONF) --defconfig=configs/defconfig Kconfig
%_defconfig: include/generated/Config.applets.in
	$(KCONF) --defconfig=configs/$@ Kconfig
oldconfig: include/generated/Config.applets.in
	$(KCONF) --oldconfig Kconfig
olddefconfig: include/generated/Config.applets.in
	$(KCONF) --olddefconfig Kconfig
menuconfig: include/generated/Config.applets.in
	kconfig-mconf Kconfig
savedefconfig: include/generated/Config.applets.in
	$(KCONF) --savedefconfig=defconfig.new Kconfig

# ---- release: static musl ----
REL_OBJS := $(patsubst %.c,$(BUILD)/%.o,$(SRCS))
$(DEPS)/musl/lib/libz.a: kconfig/deps.sh
	sh kconfig/deps.sh $(DEPS)

$(BUILD)/%.o: %.c $(GEN)/objs.mk $(DEPS)/musl/lib/libz.a
	@mkdir -p $(dir $@)
	@echo "  CC      $@"
	@$(MUSL_CC) $(REL_CFLAGS) -c $< -o $@

# The link map feeds `make size`'s breakdown.
$(OUT): $(REL_OBJS)
	$(MUSL_CC) $(REL_LDFLAGS) -Wl,-Map=$(BUILD)/imgbox.map -o $@ \
		$(REL_OBJS) $(LIBS)

# ---- developer builds with glibc, same sources: ASan/UBSan (san) and
# ThreadSanitizer (tsan); $(1) names the variables, $(2) the folder ----
define glibc_build
$(1)_OBJS := $$(patsubst %.c,$(2)/%.o,$$(SRCS))
$(2)/%.o: %.c $$(GEN)/objs.mk
	@mkdir -p $$(dir $$@)
	@echo "  CC      $$@"
	@$$($(1)_CC) $$($(1)_CFLAGS) -c $$< -o $$@
$(2)/imgbox: $$($(1)_OBJS)
	$$($(1)_CC) $$($(1)_LDFLAGS) -o $$@ $$($(1)_OBJS) $$(LIBS)
endef
$(eval $(call glibc_build,SAN,$(SANBUILD)))
$(eval $(call glibc_build,TSAN,$(TSANBUILD)))
san: $(SANBUILD)/imgbox
tsan: $(TSANBUILD)/imgbox
tsan-check: $(TSANBUILD)/imgbox
	@TSAN_BIN=$(TSANBUILD)/imgbox bash tests/tsan.sh

# ---- tests ----
UNIT_SRCS := $(wildcard tests/unit/*.c)
UNIT_BINS := $(patsubst tests/unit/%.c,$(SANBUILD)/unit/%,$(UNIT_SRCS))
LIB_SAN_OBJS := $(filter $(SANBUILD)/block/% $(SANBUILD)/formats/%,$(SAN_OBJS))
# The value-tree printers (applets/json.c) are the one applet-side file the
# unit tests use; it needs nothing else from applets/.
LIB_SAN_OBJS += $(SANBUILD)/applets/json.o
$(SANBUILD)/unit/%: tests/unit/%.c $(LIB_SAN_OBJS)
	@mkdir -p $(dir $@)
	$(SAN_CC) $(SAN_CFLAGS) $(SAN_LDFLAGS) -o $@ $< $(LIB_SAN_OBJS) $(LIBS)

# A small static build whose every image is untrusted by default
# (configs/untrusted_defconfig), for tests/untrusted.test.
UTBUILD := build/untrusted
untrusted-build:
	@$(MAKE) --no-print-directory CONFIG=$(UTBUILD)/.config \
		DEFCONFIG=configs/untrusted_defconfig GEN=$(UTBUILD)/generated \
		BUILD=$(UTBUILD) OUT=$(UTBUILD)/imgbox $(UTBUILD)/imgbox >/dev/null

check: $(OUT) $(SANBUILD)/imgbox $(UNIT_BINS) $(TSANBUILD)/imgbox untrusted-build
	@REL_BIN=$(OUT) SAN_BIN=$(SANBUILD)/imgbox UNIT_DIR=$(SANBUILD)/unit \
		TSAN_BIN=$(TSANBUILD)/imgbox \
		UNTRUSTED_BIN=$(CURDIR)/$(UTBUILD)/imgbox FUZZ_GEN=$(GEN) \
		bash tests/check.sh

# ---- install ----
# INSTALL_BIN is the binary installed (default the release one); the man
# page is made from its own --help texts, so it must run on this machine.
PREFIX  ?= /usr/local
BINDIR  ?= $(PREFIX)/bin
MANDIR  ?= $(PREFIX)/share/man
INSTALL_BIN ?= $(OUT)
MANPAGE ?= $(BUILD)/imgbox.1
INITRAMFS_HOOKDIR ?= /usr/share/initramfs-tools/hooks
DRACUT_MODDIR ?= /usr/lib/dracut/modules.d/90imgbox

$(MANPAGE): $(INSTALL_BIN) tools/mkman.sh
	@mkdir -p $(dir $@)
	sh tools/mkman.sh $(INSTALL_BIN) > $@.tmp && mv $@.tmp $@
man: $(MANPAGE)

# The links are relative symlinks, one per applet the binary lists, the
# set `imgbox --install -s` makes.
install: $(INSTALL_BIN) $(MANPAGE)
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(MANDIR)/man1 \
		$(DESTDIR)$(INITRAMFS_HOOKDIR) $(DESTDIR)$(DRACUT_MODDIR)
	install -m 755 $(INSTALL_BIN) $(DESTDIR)$(BINDIR)/imgbox
	for a in $$($(abspath $(INSTALL_BIN)) --list); do \
		ln -sfn imgbox $(DESTDIR)$(BINDIR)/$$a || exit 1; done
	install -m 644 $(MANPAGE) $(DESTDIR)$(MANDIR)/man1/imgbox.1
	sed 's|@BINDIR@|$(BINDIR)|g' dist/initramfs-tools-hook \
		> $(DESTDIR)$(INITRAMFS_HOOKDIR)/imgbox
	chmod 755 $(DESTDIR)$(INITRAMFS_HOOKDIR)/imgbox
	sed 's|@BINDIR@|$(BINDIR)|g' dist/dracut-module-setup.sh \
		> $(DESTDIR)$(DRACUT_MODDIR)/module-setup.sh
	chmod 755 $(DESTDIR)$(DRACUT_MODDIR)/module-setup.sh

# The installed binary names its links; only those that still point to
# imgbox are removed, and of the directories only the module's own.
uninstall:
	[ ! -x $(DESTDIR)$(BINDIR)/imgbox ] || \
	for a in $$($(DESTDIR)$(BINDIR)/imgbox --list); do \
		l=$(DESTDIR)$(BINDIR)/$$a; \
		[ "$$(readlink $$l)" != imgbox ] || rm -f $$l; done
	rm -f $(DESTDIR)$(BINDIR)/imgbox $(DESTDIR)$(MANDIR)/man1/imgbox.1 \
		$(DESTDIR)$(INITRAMFS_HOOKDIR)/imgbox \
		$(DESTDIR)$(DRACUT_MODDIR)/module-setup.sh
	-rmdir $(DESTDIR)$(DRACUT_MODDIR) 2>/dev/null

# ---- sizes, benchmarks, fuzzing ----
size:
	@$(MAKE) --no-print-directory $(OUT) >/dev/null
	@rm -f build/tiny/.config
	@$(MAKE) --no-print-directory CONFIG=build/tiny/.config \
		DEFCONFIG=configs/tiny_defconfig GEN=build/tiny/generated \
		BUILD=build/tiny OUT=build/tiny/imgbox build/tiny/imgbox >/dev/null
	@printf '%-16s %10s\n' config bytes
	@printf '%-16s %10s\n' defconfig $$(stat -c %s $(OUT))
	@printf '%-16s %10s\n' tiny_defconfig $$(stat -c %s build/tiny/imgbox)
	@echo; echo "defconfig, what each part puts into the binary:"
	@sh tools/size-map.sh $(BUILD)/imgbox.map
	@echo; echo "tiny_defconfig:"
	@sh tools/size-map.sh build/tiny/imgbox.map | sed -n '/group/,$$p'

demo: $(OUT)
	@bash tools/demo.sh

bench: $(OUT)
	@bash bench/run.sh

fuzz: $(GEN)/objs.mk
	@GEN=$(GEN) bash fuzz/build.sh
fuzz-smoke: $(GEN)/objs.mk
	@GEN=$(GEN) bash fuzz/build.sh smoke

clean:
	rm -rf build/release build/san build/tsan build/tiny build/untrusted build/fuzz $(OUT)
distclean: clean
	rm -rf build include/generated .config .config.old

.PHONY: all san tsan tsan-check check untrusted-build size demo bench fuzz \
	fuzz-smoke clean distclean install uninstall man \
	defconfig oldconfig olddefconfig menuconfig savedefconfig
.DELETE_ON_ERROR:

-include $(REL_OBJS:.o=.d) $(SAN_OBJS:.o=.d) $(TSAN_OBJS:.o=.d)
