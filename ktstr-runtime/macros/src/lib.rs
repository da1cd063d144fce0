use proc_macro::TokenStream;
#[proc_macro_attribute]
pub fn ktstr_test(_attr: TokenStream, item: TokenStream) -> TokenStream { item }
